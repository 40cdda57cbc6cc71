"""Where a training step's time goes on XLA's CPU backend, by kind of compiled op.

Traces a few gradient steps of a model (loss w.r.t. the parameters, batch norm
in training mode) with ``jax.profiler`` and sums the traced time of each kind
of thunk XLA ran (``ynn_fusion`` = YNNPACK convolutions / dots / reductions,
``transpose_copy_fusion`` = layout changes with the elementwise ops fused into
them, ...) over the traced threads. Convolutions that XLA hands to Eigen run
on threads the trace does not name, so the total is a lower bound on the work.

  python benchmarks/profile_train_step.py --batch 32
"""
from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile

import jax
import jax.numpy as jnp
from jax.profiler import ProfileData

from overinterp_jax.models import create_model
from overinterp_jax.train import cross_entropy


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--top", type=int, default=12)
  args = parser.parse_args()
  model = create_model(args.model, num_classes=10)
  x = jax.random.normal(jax.random.key(0), (args.batch, 32, 32, 3))
  y = jnp.arange(args.batch) % 10
  variables = model.init(jax.random.key(1), x[:1])

  def loss(params, batch_stats, images):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                  train=True, mutable=["batch_stats"])
    return cross_entropy(logits, y), updates

  grad = jax.jit(jax.grad(loss, has_aux=True))
  run = lambda: jax.block_until_ready(grad(variables["params"], variables["batch_stats"], x))
  run()
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory):
      for _ in range(args.steps):
        run()
    trace = ProfileData.from_file(glob.glob(f"{directory}/**/*.xplane.pb", recursive=True)[-1])
    by_kind, calls = collections.Counter(), collections.Counter()
    for plane in trace.planes:
      for line in plane.lines:
        if "Eigen" not in line.name:  # XLA's intra-op worker threads
          continue
        for event in line.events:
          if "ThunkExecutor" in event.name or event.name.startswith("end:"):
            continue
          kind = re.sub(r"\.\d+$", "", event.name)
          by_kind[kind] += event.duration_ns
          calls[kind] += 1
  total = sum(by_kind.values())
  print(f"{args.model}, batch {args.batch}: {total / args.steps / 1e6:.1f} ms traced per step")
  for kind, ns in by_kind.most_common(args.top):
    print(f"  {ns / args.steps / 1e6:8.2f} ms  {100 * ns / total:5.1f}%  "
          f"{calls[kind] / args.steps:6.1f} calls  {kind}")


if __name__ == "__main__":
  main()
