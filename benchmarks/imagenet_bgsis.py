"""Batched Gradient SIS on ImageNet models: throughput, memory and what a val run costs.

For Inception v3 at 299×299 and ResNet-50 at 224×224 (random weights:
He-normal kernels, identity batch norms; throughput does not depend on them), at
batch B on one device, with k = 100 pixels removed per step, no noise and
mean-colour masking (zeros after normalisation), as the paper's ImageNet runs:

  (a) plain forward+backward: gradient of the summed target softmax w.r.t. the
      input, images/s (best of ``--steps`` calls after one warm-up);
  (b) BGSIS steps: forward+backward passes/s (images·steps/s) of the real
      per-step program of ``sis.gradient_backselect`` (``sis.programs.batched_gradient_programs``:
      gradient w.r.t. the removal mask, top-k, mask update), best of ``--steps``
      steps after one warm-up step;
  (c) b / a (the target is >= 0.8);
  (d) seconds per image of a whole selection, ``ceil(d / k)`` steps (895 at 299²,
      502 at 224²) at rate (b); the two extra forward passes (targets, final
      score) are left out (< 0.2%);
  (e) peak memory: the process's max RSS (CPU) or the device's
      ``peak_bytes_in_use`` (GPU/TPU), cumulative over the run;
  (f) XLA FLOPs per image of one forward+backward pass (``cost_analysis`` of (a)
      and of the step program);
  (g) hours for the 50,000 val images on this device at rate (b), and on one
      accelerator from the step's FLOPs at an assumed utilisation (printed).

  python benchmarks/imagenet_bgsis.py --batch 64                 # GPU/TPU
  python benchmarks/imagenet_bgsis.py --batch 2 --steps 2 --out r.json   # CPU
  python benchmarks/imagenet_bgsis.py --small                    # test size, < 60 s on CPU

``--small`` runs Inception v3 at 75×75 and ResNet-50 at 32×32, batch 1, one
timed step, compiled without most XLA optimisations (its rates mean nothing;
it checks that the script runs), and says so in every row. ``--batch 0`` takes the largest batch
whose gradient pass fits the memory budget (``sis.gradient_batch_size``, at
most 128).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from backselect import best_seconds  # noqa: E402
from timing import PEAK_BF16_FLOPS  # noqa: E402

from overinterp_jax import precision, sharding, sis  # noqa: E402
from overinterp_jax.models import create_model, torch_weights  # noqa: E402
from overinterp_jax.selection import gradient  # noqa: E402

SIZES = {"inception_v3": 299, "resnet50": 224}
SMALL_SIZES = {"inception_v3": 75, "resnet50": 32}
NUM_CLASSES = 1000
REMOVE_PER_STEP = 100
VAL_IMAGES = 50_000
MFU = 0.4
# Accelerators for the FLOP-based projection: (name, dense bf16 peak FLOP/s).
PROJECTED = (("H100/H200", PEAK_BF16_FLOPS["H100"]), ("TPU v5e", PEAK_BF16_FLOPS["TPU v5e"]))
BATCH_CAP = 128


def random_variables(name: str, seed: int = 0):
  """Random variables of ``name`` with 1,000 classes, without compiling ``model.init``
  (that takes ~30 s for Inception v3 on a CPU): He-normal kernels, zero biases,
  batch norm scale 1, running mean 0, running variance 1."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    leaf_name = jax.tree_util.keystr(path[-1:])
    if "kernel" in leaf_name:
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) * np.sqrt(2.0 / fan_in))
    value = 1.0 if ("scale" in leaf_name or "var" in leaf_name) else 0.0
    return jnp.full(leaf.shape, value, jnp.float32)

  return jax.tree_util.tree_map_with_path(
      fill, torch_weights.variables_template(name, NUM_CLASSES))


def build(name: str, policy: str):
  """``(predict(variables, x [B, H, W, 3]) -> logits [B, 1000], variables)``."""
  model = create_model(name, num_classes=NUM_CLASSES)
  predict = precision.in_compute_dtype(lambda v, x: model.apply(v, x, train=False), policy)
  return predict, random_variables(name)


def peak_memory() -> tuple[int, str]:
  """``(bytes, what)``: the device's peak allocation, or this process's max RSS."""
  device = jax.devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # backends without memory statistics
    stats = {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process max RSS"


def compiled_with_flops(jitted, *args, items: int):
  """``(executable of jitted(*args), XLA FLOPs per item or nan)``: one compilation
  serves both the timing and the FLOP count."""
  compiled = jitted.lower(*args).compile()
  try:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return compiled, float(cost["flops"]) / items
  except Exception:
    return compiled, float("nan")


def plain_fwd_bwd(predict, variables, x, targets, repeats: int) -> tuple[float, float]:
  """(a) and its FLOPs: ``(images/s, FLOPs per image)``."""
  def objective(v, x):
    p = jax.nn.softmax(predict(v, x).astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(p, targets[:, None], axis=1).sum()
  b = x.shape[0]
  compiled, flops = compiled_with_flops(jax.jit(jax.grad(objective, argnums=1)), variables, x,
                                        items=b)
  seconds = best_seconds(lambda: compiled(variables, x).block_until_ready(), repeats,
                         min_seconds=0.0)
  return b / seconds, flops


def bgsis_steps(predict, variables, x, repeats: int) -> tuple[float, float, int]:
  """(b) and its FLOPs: ``(passes/s, FLOPs per image per step, steps per selection)``.

  Runs ``init`` and ``1 + repeats`` steps of the compiled per-step programs of
  ``sis.gradient_backselect`` (the same calls, on a one-device mesh).
  """
  images, fully_masked, _, fmap, d, pixel_shape, targets = sis.batched.prepare_images(
      x, None, None, None)
  b = images.shape[0]
  mesh = sharding.data_mesh(jax.devices()[:1])
  model = sis.programs.traced_model(predict, variables, images, (b,))
  init, step, _ = sis.programs.batched_gradient_programs(model, True, REMOVE_PER_STEP, d, 0.0,
                                                         pixel_shape, mesh)
  keys = jax.random.key_data(jax.random.split(jax.random.key(0), b))  # unused: no noise
  const, state = init((variables, model.consts), fmap,
                      *(sharding.shard_rows(mesh, a) for a in (images, fully_masked, targets,
                                                                 keys)))
  compiled, flops = compiled_with_flops(step, const, state, jnp.int32(0), items=b)
  holder = {"state": state, "s": 0}

  def one_step():
    holder["state"] = compiled(const, holder["state"], jnp.int32(holder["s"]))
    holder["s"] += 1
    jax.block_until_ready(holder["state"])

  seconds = best_seconds(one_step, repeats, min_seconds=0.0)  # one step per round
  return b / seconds, flops, gradient.num_steps(d, REMOVE_PER_STEP)


def bench(name: str, args, policy: str) -> dict:
  size = (SMALL_SIZES if args.small else SIZES)[name]
  predict, variables = build(name, policy)
  batch = args.batch
  if batch == 0:
    shape = np.broadcast_to(np.zeros((), np.float32), (BATCH_CAP, size, size, 3))
    batch = sis.gradient_batch_size(predict, shape, params=variables,
                                    mesh=sharding.data_mesh(jax.devices()[:1]))
  x = jax.random.normal(jax.random.key(1), (batch, size, size, 3), jnp.float32)
  targets = jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES
  plain, plain_flops = plain_fwd_bwd(predict, variables, x, targets, args.steps)
  passes, step_flops, steps = bgsis_steps(predict, variables, x, args.steps)
  memory, memory_kind = peak_memory()
  seconds_per_image = steps / passes
  row = dict(model=name, image_size=size, batch=batch, remove_per_step=REMOVE_PER_STEP,
             features=size * size, steps_per_image=steps, timed_steps=args.steps,
             plain_fwd_bwd_img_per_s=plain, bgsis_passes_per_s=passes,
             ratio=passes / plain, seconds_per_image=seconds_per_image,
             peak_memory_bytes=memory, peak_memory_kind=memory_kind,
             plain_fwd_bwd_flops_per_image=plain_flops, step_flops_per_image=step_flops,
             val_hours_this_device=VAL_IMAGES * seconds_per_image / 3600,
             small=args.small)
  for accel, peak in PROJECTED:
    row[f"val_hours_{accel}"] = VAL_IMAGES * steps * step_flops / (peak * MFU) / 3600
  return row


def print_table(rows, device: str, policy: str) -> None:
  print(f"\nBatched Gradient SIS, k={REMOVE_PER_STEP}, no noise, zero (mean-colour) masking; "
        f"random weights; device {device}; precision {policy}")
  head = (f"{'model':<13}{'size':>5}{'B':>5}{'fwd+bwd img/s':>15}{'BGSIS passes/s':>16}"
          f"{'ratio':>7}{'steps':>7}{'s/image':>10}{'peak mem GiB':>14}{'GFLOP/pass':>12}"
          f"{'50k val h':>11}" + "".join(f"{a + ' h':>14}" for a, _ in PROJECTED))
  print(head)
  for r in rows:
    print(f"{r['model']:<13}{r['image_size']:>5}{r['batch']:>5}"
          f"{r['plain_fwd_bwd_img_per_s']:>15.3f}{r['bgsis_passes_per_s']:>16.3f}"
          f"{r['ratio']:>7.2f}{r['steps_per_image']:>7}{r['seconds_per_image']:>10.1f}"
          f"{r['peak_memory_bytes'] / 2**30:>14.2f}{r['step_flops_per_image'] / 1e9:>12.2f}"
          f"{r['val_hours_this_device']:>11.1f}"
          + "".join(f"{r['val_hours_' + a]:>14.2f}" for a, _ in PROJECTED))
  print(f"GFLOP/pass: XLA cost_analysis of one BGSIS step per image (plain fwd+bwd: "
        + ", ".join(f"{r['model']} {r['plain_fwd_bwd_flops_per_image'] / 1e9:.2f}" for r in rows)
        + f"). Accelerator hours assume {MFU:.0%} MFU of the dense bf16 peak: "
        + ", ".join(f"{a} {p / 1e12:.0f} TFLOP/s" for a, p in PROJECTED)
        + f". Peak memory: {rows[0]['peak_memory_kind']}, cumulative."
        + (" SMALL sizes, unoptimised compile (--small): not real figures."
           if rows and rows[0]["small"] else ""))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="inception_v3,resnet50",
                      help="comma-separated: inception_v3, resnet50")
  parser.add_argument("--batch", type=int, default=0,
                      help=f"images per step; 0 = the most that fit the memory budget "
                           f"(at most {BATCH_CAP})")
  parser.add_argument("--steps", type=int, default=3, help="timed calls after one warm-up")
  parser.add_argument("--small", action="store_true", help="tiny sizes (a test runs it)")
  parser.add_argument("--precision", default=None, choices=sorted(precision.POLICIES),
                      help="compute dtype; default bfloat16 on GPU/TPU, float32 on CPU")
  parser.add_argument("--out", default=None, help="also write the rows as JSON here")
  args = parser.parse_args(argv)
  models = [m for m in args.models.split(",") if m]
  unknown = sorted(set(models) - set(SIZES))
  if unknown or not models:
    parser.error(f"--models: unknown {unknown or 'none given'}; known: {sorted(SIZES)}.")
  if args.batch < 0 or args.steps < 1:
    parser.error("--batch must be >= 0 and --steps >= 1.")
  if args.small:
    args.batch, args.steps = args.batch or 1, 1
  policy = args.precision or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  device = f"{jax.devices()[0].device_kind} ({jax.default_backend()})"
  rows = []
  previous = jax.config.read("jax_disable_most_optimizations")
  if args.small:  # compile time dominates at these sizes
    jax.config.update("jax_disable_most_optimizations", True)
  try:
    for name in models:
      start = time.perf_counter()
      rows.append(bench(name, args, policy))
      print(f"{name}: done in {time.perf_counter() - start:.0f} s", flush=True)
  finally:
    if args.small:  # no unoptimised executable outlives the call
      jax.config.update("jax_disable_most_optimizations", previous)
      jax.clear_caches()
  print_table(rows, device, policy)
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(dict(device=device, precision=policy, date=time.strftime("%Y-%m-%d"),
                     remove_per_step=REMOVE_PER_STEP, mfu_assumed=MFU,
                     projected_peaks=dict(PROJECTED),
                     weights="random (He-normal kernels, identity batch norm)",
                     note="shared 2-core CPU: rough numbers" if jax.default_backend() == "cpu"
                     else "", rows=rows), fh, indent=1)
  return rows


if __name__ == "__main__":
  main()
