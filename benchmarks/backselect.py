"""Backward-selection throughput, as ratios measured in one run on one machine.

For each model (CIFAR-shaped input, 32×32×3, 10 classes) this prints:
  * plain batched inference, images/s, at the batch size backselect uses;
  * exact backselect (``sis.batched_backselect``): masked evaluations/s,
    seconds per image, and the ratio of evaluations/s to plain inference;
  * the same backselect structured like the reference library (Python loop
    per step, masks built in numpy, a jitted ``f`` called on fixed batches of
    128 as in the paper's code), seconds per image, and our speed-up over it;
  * Batched Gradient SIS: forward+backward passes/s inside
    ``sis.gradient_backselect`` vs a plain jitted forward+backward of the
    same model at the same batch;
  * peak memory: XLA's temp buffers of the compiled backselect program and
    this process's max RSS.

Exact backselect costs d(d+1)/2 evaluations per image (524,800 for 1,024
pixels), so by default the large models run on a coarser feature map
(``--features``, e.g. 256 = 2×2 patches); seconds per image for full
1,024-pixel backselect are then extrapolated from the measured evaluations/s
and labelled so. ``--full`` runs every model at 1,024 pixels.

Usage:
  python benchmarks/backselect.py                       # CPU defaults, ~12 min
  python benchmarks/backselect.py --models resnet20 --full --eval_batch 1024  # GPU
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from overinterp_jax import sis
from overinterp_jax.models import create_model
from overinterp_jax.selection import exact

IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10


# Benchmark-only variants: name -> (registry name, constructor arguments).
VARIANTS = {"mlp32": ("mlp", {"hidden": 32})}


def build(name: str):
  base, kwargs = VARIANTS.get(name, (name, {}))
  model = create_model(base, num_classes=NUM_CLASSES, **kwargs)
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + IMAGE_SHAPE), train=False)
  predict = lambda v, x: model.apply(v, x, train=False)
  return predict, variables


def best_seconds(fn, repeats: int, min_seconds: float = 1.0) -> float:
  """Best per-call time over ``repeats`` rounds, each calling ``fn`` for >= ``min_seconds``."""
  fn()  # compile and warm up
  best = float("inf")
  for _ in range(repeats):
    calls = 0
    t0 = time.perf_counter()
    while True:
      fn()
      calls += 1
      elapsed = time.perf_counter() - t0
      if elapsed >= min_seconds:
        break
    best = min(best, elapsed / calls)
  return best


def plain_inference_rate(predict, variables, batch: int, repeats: int) -> float:
  f = jax.jit(predict)
  x = jax.random.normal(jax.random.key(1), (batch,) + IMAGE_SHAPE)
  return batch / best_seconds(lambda: f(variables, x).block_until_ready(), repeats)


def fwd_bwd_rate(predict, variables, batch: int, repeats: int) -> float:
  def objective(x):
    p = jax.nn.softmax(predict(variables, x))
    return p[:, 0].sum()
  g = jax.jit(jax.grad(objective))
  x = jax.random.normal(jax.random.key(2), (batch,) + IMAGE_SHAPE)
  return batch / best_seconds(lambda: g(x).block_until_ready(), repeats)


def default_eval_batch(predict, variables) -> int:
  """The eval batch ``sis.batched_backselect`` picks by default (memory budget)."""
  return sis.programs.cached_eval_batch_size(
      predict, variables, jnp.zeros((1,) + IMAGE_SHAPE), jax.ShapeDtypeStruct((1,), jnp.int32),
      budget_bytes=sis.DEFAULT_MEMORY_BUDGET_BYTES, cap=1 << 30)


def patch_map(num_features: int) -> np.ndarray:
  side = int(round(num_features ** 0.5))
  if side * side != num_features or 32 % side:
    raise ValueError(f"--features must be a square dividing 32×32, got {num_features}.")
  cell = 32 // side
  rows = np.arange(32) // cell
  return (rows[:, None] * side + rows[None, :]).astype(np.int32)


def reference_structured_backselect(predict, variables, image, target, fmap, batch: int):
  """The reference library's structure: Python loop per step, numpy masks, fixed batches."""
  f = jax.jit(lambda x: jax.nn.softmax(predict(variables, x))[:, target])
  d = int(fmap.max()) + 1
  image = np.asarray(image)
  present = np.ones(d, bool)
  order = []
  for _ in range(d):
    cands = np.flatnonzero(present)
    masks = np.repeat(present[None], len(cands), 0)
    masks[np.arange(len(cands)), cands] = False
    scores = []
    for s in range(0, len(cands), batch):
      chunk = masks[s:s + batch]
      pad = batch - len(chunk)
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, 0)]) if pad else chunk
      inputs = np.where(chunk[:, fmap][..., None], image[None], 0.0).astype(np.float32)
      scores.append(np.asarray(f(inputs))[:batch - pad])
    best = int(np.argmax(np.concatenate(scores)))
    order.append(cands[best])
    present[cands[best]] = False
  return np.array(order)


def program_temp_bytes(predict, variables, images, eval_batch, group, d) -> int | None:
  model = sis.programs.traced_model(predict, variables, images,
                                    (group,) + exact.chunk_sizes(eval_batch))
  program = sis.programs.batched_exact_program(
      model, True, eval_batch, group, d, (32, 32) if d == 1024 else None, True,
      jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)))
  fmap = jnp.asarray(patch_map(d) if d != 1024 else np.arange(1024).reshape(32, 32))[..., None]
  n = images.shape[0]
  try:
    stats = program.lower((variables, model.consts), fmap.astype(jnp.int32), images,
                          jnp.zeros_like(images), -jnp.ones((n,), jnp.int32),
                          jnp.ones((n, d), bool)).compile().memory_analysis()
    return int(stats.temp_size_in_bytes) if stats is not None else None
  except Exception:
    return None


def bench_model(name: str, args) -> dict:
  predict, variables = build(name)
  full = args.full or name in args.full_models
  d = 1024 if full else args.features
  n_images = args.images if full else args.patch_images
  fmap = patch_map(d) if d != 1024 else None
  fmap_np = patch_map(d) if d != 1024 else np.arange(1024, dtype=np.int32).reshape(32, 32)
  b = args.eval_batch or default_eval_batch(predict, variables)
  out = {"model": name, "features": d, "eval_batch": b, "reference_batch": args.reference_batch}
  out["plain_inference_img_per_s"] = plain_inference_rate(predict, variables, b, args.repeats)

  images = jax.random.normal(jax.random.key(3), (n_images,) + IMAGE_SHAPE)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  run = lambda: sis.batched_backselect(predict, images, params=variables, feature_map=fmap,
                                       eval_batch_size=b, images_per_group=n_images, mesh=mesh)
  small = jax.random.normal(jax.random.key(4), (n_images,) + IMAGE_SHAPE)
  sis.batched_backselect(predict, small, params=variables, feature_map=fmap,
                         eval_batch_size=b, images_per_group=n_images, mesh=mesh)  # compile
  t0 = time.perf_counter()
  res = run()
  seconds = time.perf_counter() - t0
  evals = n_images * (d * (d + 1) // 2 + 1)
  out["exact_masked_evals_per_s"] = evals / seconds
  out["exact_seconds_per_image"] = seconds / n_images
  out["exact_vs_plain_inference"] = out["exact_masked_evals_per_s"] / out["plain_inference_img_per_s"]
  out["exact_seconds_per_1024px_image" + ("" if d == 1024 else "_extrapolated")] = (
      (1024 * 1025 // 2 + 1) / out["exact_masked_evals_per_s"])

  t0 = time.perf_counter()
  ref_order = reference_structured_backselect(predict, variables, images[0],
                                              int(res.target_classes[0]), fmap_np,
                                              args.reference_batch)
  ref_seconds = time.perf_counter() - t0
  out["reference_loop_seconds_per_image"] = ref_seconds
  out["speedup_vs_reference_loop"] = ref_seconds / out["exact_seconds_per_image"]
  out["reference_loop_same_order"] = bool(np.array_equal(ref_order, res.order[0]))

  gb = args.grad_batch
  gimages = jax.random.normal(jax.random.key(5), (gb,) + IMAGE_SHAPE)
  k = args.remove_per_step
  grun = lambda: sis.gradient_backselect(predict, gimages, params=variables,
                                         remove_per_step=k, batch_size=gb, mesh=mesh)
  gseconds = best_seconds(grun, 2, min_seconds=0.0)
  passes = gb * (-(-1024 // k) + 1)
  out["gradient_remove_per_step"] = k
  out["gradient_images_per_s"] = gb / gseconds
  out["gradient_fwd_bwd_per_s"] = passes / gseconds
  out["plain_fwd_bwd_img_per_s"] = fwd_bwd_rate(predict, variables, gb, args.repeats)
  out["gradient_vs_fwd_bwd"] = out["gradient_fwd_bwd_per_s"] / out["plain_fwd_bwd_img_per_s"]
  out["exact_program_temp_bytes"] = program_temp_bytes(predict, variables, images, b,
                                                       n_images, d)
  out["max_rss_bytes_so_far"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="mlp32,mlp,cnn3,resnet20",
                      help="registry names, or mlp32 (the MLP with a 32-unit hidden layer)")
  parser.add_argument("--features", type=int, default=256,
                      help="features for models not run at full 1,024 pixels (square patches)")
  parser.add_argument("--full", action="store_true", help="every model at 1,024 pixels")
  parser.add_argument("--full_models", default="mlp32,mlp,cnn3",
                      help="models run at 1,024 pixels even without --full")
  parser.add_argument("--images", type=int, default=4,
                      help="images per exact backselect at 1,024 pixels")
  parser.add_argument("--patch_images", type=int, default=4,
                      help="images per exact backselect on the coarser feature map")
  parser.add_argument("--eval_batch", type=int, default=0,
                      help="masked images per model call; 0 = the library's default "
                           "(from its memory budget). Plain inference uses the same batch.")
  parser.add_argument("--reference_batch", type=int, default=128,
                      help="fixed batch of the reference-structured loop (the paper's code "
                           "evaluates f in chunks of 128)")
  parser.add_argument("--grad_batch", type=int, default=64)
  parser.add_argument("--remove_per_step", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--json", default=None, help="also write the results here")
  args = parser.parse_args()
  args.full_models = [m for m in args.full_models.split(",") if m]
  print(f"backend={jax.default_backend()} devices={jax.devices()}")
  results = []
  for name in args.models.split(","):
    r = bench_model(name, args)
    results.append(r)
    print(json.dumps(r, indent=1), flush=True)
  print("\nmodel     d     plain img/s  exact evals/s  ratio  s/img(1024px)  ref-loop s/img  "
        "speedup  grad passes/s  fwd+bwd img/s  ratio")
  for r in results:
    s1024 = r.get("exact_seconds_per_1024px_image",
                  r.get("exact_seconds_per_1024px_image_extrapolated"))
    print(f"{r['model']:9s} {r['features']:5d} {r['plain_inference_img_per_s']:12.0f} "
          f"{r['exact_masked_evals_per_s']:14.0f} {r['exact_vs_plain_inference']:6.2f} "
          f"{s1024:14.1f} {r['reference_loop_seconds_per_image'] * (1 if r['features'] else 1):15.1f} "
          f"{r['speedup_vs_reference_loop']:8.1f} {r['gradient_fwd_bwd_per_s']:14.0f} "
          f"{r['plain_fwd_bwd_img_per_s']:14.0f} {r['gradient_vs_fwd_bwd']:6.2f}")
  if args.json:
    with open(args.json, "w") as fh:
      json.dump(results, fh, indent=1)


if __name__ == "__main__":
  main()
