"""The throughput figures that matter on an accelerator, as one table from one run.

Rows: ResNet-20 plain inference; exact backselect of CIFAR images with
ResNet-20 (masked evaluations/s, seconds per image, ratio to plain inference);
Batched Gradient SIS with ResNet-20 on CIFAR; training of ResNet-20 (batch
128) and ResNet-50 (224×224). Each row gives its model FLOP utilisation:
XLA's FLOP count per item (``cost_analysis``) × rate ÷ the device's peak (the
vendor's dense bfloat16 figure for GPUs/TPUs, named in the output; on a CPU
the rate of a large float32 matmul measured in the same run). Batch sizes of
backselect and gradient SIS come from the device's memory
(``overinterp_jax/memory.py``) and are printed.

  python benchmarks/accelerator.py                    # GPU/TPU, full sizes (<= 8 min)
  python benchmarks/accelerator.py --small            # CPU, small sizes (~1 min)
  python benchmarks/accelerator.py --out results.json

``--small`` shrinks every size (fewer images, 8×8-pixel features for the exact
backselect, training batch 32, ResNet-50 at 32×32 with batch 4) and says so in each row; a test
runs it so it cannot rot. The Inception v3 row is ``benchmarks/imagenet_bgsis.py``'s
Batched Gradient SIS at 299×299 (75×75 with ``--small``), k = 100, batch from memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import PEAK_BF16_FLOPS, rate  # noqa: E402

from overinterp_jax import memory, precision, sharding, sis, train  # noqa: E402
from overinterp_jax.config_schema import base_config  # noqa: E402
from overinterp_jax.models import create_model  # noqa: E402
from overinterp_jax.selection import features  # noqa: E402

FULL = dict(infer_batch=1024, exact_images=8, exact_patch=1, grad_images=2048, grad_k=32,
            train_batch=128, r50_batch=128, r50_size=224, min_seconds=3.0)
SMALL = dict(infer_batch=32, exact_images=1, exact_patch=8, grad_images=8, grad_k=128,
             train_batch=32, r50_batch=4, r50_size=32, min_seconds=0.2)


def device_peak() -> tuple[float, str]:
  """``(peak FLOP/s, where the number comes from)`` of the first device."""
  device = jax.devices()[0]
  for name, peak in PEAK_BF16_FLOPS.items():
    if name.lower() in device.device_kind.lower():
      return peak, f"{device.device_kind}: vendor dense bf16 peak"
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  flops = rate(lambda: matmul(a).block_until_ready(), 2 * n ** 3, min_seconds=0.5, rounds=3)
  return flops, f"{device.device_kind}: measured float32 {n}×{n} matmul"


def flops_per_item(fn, *args, items: int) -> float:
  """XLA's FLOP count of ``jit(fn)(*args)`` divided by ``items`` (nan if unknown)."""
  try:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) / items
  except Exception:
    return float("nan")


def timed(fn, repeats: int = 2) -> float:
  """Best seconds of ``fn()`` after one warm-up call."""
  fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def resnet(name: str, size: int, num_classes: int, policy: str):
  model = create_model(name, num_classes=num_classes)
  variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
  apply = precision.in_compute_dtype(lambda v, x: model.apply(v, x, train=False), policy)
  return model, variables, apply


def train_rate(name: str, size: int, batch: int, num_classes: int, policy: str, sizes: dict):
  """``(train img/s, train FLOPs per image, inference img/s at the same batch)``."""
  config = base_config()
  config.train.update(dict(lr=0.1, schedule="onecycle", num_epochs=1, warmup_fraction=0.2))
  model = create_model(name, num_classes=num_classes)
  tx = train.make_optimizer(config, steps_per_epoch=100)
  mesh = sharding.data_mesh()
  state = train.create_train_state(model, tx, (size, size, 3), jax.random.key(0))
  state = jax.device_put(state, sharding.replicated(mesh))
  steps = train.compile_steps(mesh, compute_dtype=policy)
  x = jax.random.normal(jax.random.key(1), (batch, size, size, 3))
  y = jnp.arange(batch, dtype=jnp.int32) % num_classes
  key = jax.random.key(2)
  holder = [state]

  def step():
    holder[0], m = steps.train(holder[0], x, y, key)
    m["loss"].block_until_ready()

  flops = flops_per_item(lambda s: train.train_step(s, x, y, key, compute_dtype=policy),
                         state, items=batch)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  apply = precision.in_compute_dtype(lambda v, xb: model.apply(v, xb, train=False), policy)
  infer = jax.jit(apply)
  plain = rate(lambda: infer(variables, x).block_until_ready(), batch,
               min_seconds=sizes["min_seconds"])
  return rate(step, batch, min_seconds=sizes["min_seconds"]), flops, plain


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="CPU-sized run (see the docstring)")
  parser.add_argument("--precision", default=None, choices=sorted(precision.POLICIES),
                      help="compute dtype; default bfloat16 on GPU/TPU, float32 on CPU")
  parser.add_argument("--skip", default="", help="comma-separated row names to skip")
  parser.add_argument("--out", default=None, help="also write the rows as JSON here")
  args = parser.parse_args(argv)
  sizes = SMALL if args.small else FULL
  on_cpu = jax.default_backend() == "cpu"
  policy = args.precision or ("float32" if on_cpu else "bfloat16")
  skip = set(filter(None, args.skip.split(",")))
  peak, peak_source = device_peak()
  budget = memory.device_budget_bytes()
  print(f"device: {jax.devices()[0].device_kind} × {jax.device_count()}; precision {policy}; "
        f"peak {peak / 1e12:.2f} TFLOP/s ({peak_source}); memory budget per program "
        f"{budget / 2**30:.1f} GiB")
  rows = []

  def add(name, setting, value, unit, flops, note=""):
    mfu = value * flops / peak if np.isfinite(flops) else float("nan")
    rows.append(dict(name=name, setting=setting, value=value, unit=unit,
                     flops_per_item=flops, mfu=mfu, note=note))
    # Each row as soon as it is measured: a run stopped by a time limit keeps what it measured.
    print(f"row: {name} | {setting} | {value:,.1f} {unit} | MFU {mfu:.1%} | {note}", flush=True)

  model, variables, apply = resnet("resnet20", 32, 10, policy)
  x = jax.random.normal(jax.random.key(3), (sizes["infer_batch"], 32, 32, 3))
  fwd_flops = flops_per_item(apply, variables, x, items=sizes["infer_batch"])
  infer = jax.jit(apply)
  plain = rate(lambda: infer(variables, x).block_until_ready(), sizes["infer_batch"],
               min_seconds=sizes["min_seconds"])
  add("resnet20 inference", f"batch {sizes['infer_batch']}", plain, "img/s", fwd_flops)

  if "exact" not in skip:
    n, patch = sizes["exact_images"], sizes["exact_patch"]
    fmap = None if patch == 1 else features.patch_feature_map(32, 32, patch)
    d = 1024 // patch ** 2
    images = x[:n]
    eval_batch = sis.programs.cached_eval_batch_size(
        apply, variables, images[:1], jax.ShapeDtypeStruct((1,), jnp.int32),
        budget_bytes=budget, cap=n * d)
    seconds = timed(lambda: sis.batched_backselect(apply, images, params=variables,
                                                   feature_map=fmap), repeats=1)
    evals = n * d * (d + 1) / 2 / seconds
    hours_all = 10_000 * 1024 * 1025 / 2 / evals / 3600
    add("exact backselect resnet20", f"{n} images, {d} features, eval batch {eval_batch}",
        evals, "masked evals/s", fwd_flops,
        f"{seconds / n:.2f} s/image at {d} features; ratio to inference {evals / plain:.2f}; "
        f"all 10,000 test images at 1,024 px: {hours_all:.1f} h")

  if "gradient" not in skip:
    n, k = sizes["grad_images"], sizes["grad_k"]
    images = jax.random.normal(jax.random.key(4), (n, 32, 32, 3))
    batch = sis.gradient_batch_size(apply, images, params=variables)
    grad_flops = flops_per_item(
        lambda v, xb: jax.grad(lambda xb: apply(v, xb).sum())(xb), variables, images[:batch],
        items=batch)
    seconds = timed(lambda: sis.gradient_backselect(apply, images, params=variables,
                                                    remove_per_step=k, batch_size=batch),
                    repeats=1)
    passes = -(-1024 // k) + 1
    add("gradient SIS resnet20", f"{n} images, k={k}, batch {batch}", n / seconds, "img/s",
        grad_flops * passes, f"{n * passes / seconds:,.0f} fwd+bwd passes/s")

  if "train_resnet20" not in skip:
    b = sizes["train_batch"]
    train_ips, flops, infer_ips = train_rate("resnet20", 32, b, 10, policy, sizes)
    add("train resnet20", f"batch {b}", train_ips, "img/s", flops,
        f"ratio to inference/3: {train_ips / (infer_ips / 3):.2f}")
  if "train_resnet50" not in skip:
    b, size = sizes["r50_batch"], sizes["r50_size"]
    train_ips, flops, infer_ips = train_rate("resnet50", size, b, 1000, policy, sizes)
    add("train resnet50", f"batch {b}, {size}×{size}", train_ips, "img/s", flops,
        f"ratio to inference/3: {train_ips / (infer_ips / 3):.2f}")

  if "inception" not in skip:  # the ImageNet config's selection (benchmarks/imagenet_bgsis.py)
    import imagenet_bgsis  # pylint: disable=import-outside-toplevel
    r = imagenet_bgsis.bench("inception_v3", argparse.Namespace(
        small=args.small, batch=1 if args.small else 0, steps=2), policy)
    add("gradient SIS inception_v3 299",
        f"batch {r['batch']}, k=100, {r['image_size']}×{r['image_size']}",
        r["bgsis_passes_per_s"] / r["steps_per_image"], "img/s",
        r["step_flops_per_image"] * r["steps_per_image"],
        f"{r['bgsis_passes_per_s']:.2f} fwd+bwd passes/s, ratio to plain fwd+bwd "
        f"{r['ratio']:.2f}; 50,000 val images: {r['val_hours_this_device']:.0f} h")

  print(f"\n{'row':<32}{'setting':<44}{'rate':>16} {'unit':<16}{'GFLOP/item':>11}{'MFU':>8}  note")
  for r in rows:
    print(f"{r['name']:<32}{r['setting']:<44}{r['value']:>16,.1f} {r['unit']:<16}"
          f"{r['flops_per_item'] / 1e9:>11.3f}{r['mfu']:>8.1%}  {r['note']}")
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(dict(device=jax.devices()[0].device_kind, devices=jax.device_count(),
                     precision=policy, peak_flops=peak, peak_source=peak_source,
                     small=args.small, date=time.strftime("%Y-%m-%d"), rows=rows), fh, indent=1)
  return rows


if __name__ == "__main__":
  main()
