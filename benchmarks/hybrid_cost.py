"""What hybrid backward selection costs, and what its 5% subsets are worth (CPU-sized).

On the shipped ResNet-20 (``resnet20_cifar10``) and a seeded sample of the shipped
CIFAR-10 test slice, for each method:
  * seconds per image (wall time of one call on all sampled images, less the time XLA
    spent compiling, which is reported apart);
  * model evaluations and gradient passes per image;
  * the base model's mean confidence in its target on the image's own 5% subset
    (``sis.keep_mask(order, 0.05)``, the rest at the mean colour, 0 after
    normalisation), and the fraction of images where it is ≥ τ = 0.99;
  * the overlap of the 5% subsets with the gradient's (and the exact ones', on the
    images ranked exactly).
Methods: Batched Gradient SIS (``remove_per_step`` and ``batch_size`` of
``configs/cifar10_cpu.py``), hybrid at each ``--switch`` fraction with the same k, and
exact backward selection on the first ``--exact-images`` images (about 9 minutes per image
on a 2-core CPU: 0 = skip).

  python benchmarks/hybrid_cost.py --images 20 --switch 0.1 0.2 --exact-images 2 \\
      --out benchmarks/results/hybrid_cost_cpu.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from configs import cifar10_cpu  # noqa: E402
from overinterp_jax import sis  # noqa: E402
from overinterp_jax.data import cifar10_slice  # noqa: E402
from overinterp_jax.data.normalize import Normalization  # noqa: E402
from overinterp_jax.models import shipped  # noqa: E402

MODEL = "resnet20_cifar10"
FRAC_KEPT = 0.05
TAU = 0.99


class CompileClock:
  """Seconds XLA spends compiling while the clock is installed (JAX's monitoring events)."""
  EVENT = "/jax/core/compile/backend_compile_duration"

  def __init__(self):
    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, seconds: float, **_) -> None:
    if event == self.EVENT:
      self.seconds += seconds


def sample(num_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """``(images [n, 32, 32, 3]`` normalised float32, ``labels [n])`` of a seeded sample of the
  slice (never its first images: they are ordered by class)."""
  test = cifar10_slice.load()["test"]
  idx = np.sort(np.random.default_rng(seed).permutation(len(test.labels))[:num_images])
  norm = Normalization(**shipped.info(MODEL)["normalization"])
  return norm.normalize(test.images[idx]), test.labels[idx]


def confidence(predict, images, order, targets) -> np.ndarray:
  """``[n]`` target probability on each image's own 5% subset (masked at 0, the mean)."""
  masked = sis.apply_feature_mask(images, sis.keep_mask(order, FRAC_KEPT))
  probs = np.concatenate([np.asarray(jax.nn.softmax(predict(masked[i:i + 250]), axis=-1))
                          for i in range(0, len(masked), 250)])
  return probs[np.arange(len(targets)), targets]


def timed(clock: CompileClock, run) -> tuple[sis.BackselectResult, float, float]:
  """``(result, seconds less compiling, compile seconds)`` of ``run()``."""
  before, t0 = clock.seconds, time.perf_counter()
  result = run()
  wall = time.perf_counter() - t0
  compile_s = clock.seconds - before
  return result, wall - compile_s, compile_s


def summary(seconds, compile_s, n, evals, passes, conf, keep, references) -> dict:
  """One method's row: cost per image, its 5% subsets' confidence, overlap with the
  ``references`` (``{name: [m, d] keep masks}`` of the first ``m`` images)."""
  out = {"images": n, "seconds_per_image": seconds / n, "compile_seconds": compile_s,
         "model_evaluations_per_image": evals, "gradient_passes_per_image": passes,
         "mean_confidence_5pct": float(conf.mean()),
         "fraction_at_least_tau": float((conf >= TAU).mean())}
  for name, ref in references.items():
    m = min(len(ref), len(keep))
    out[f"overlap_with_{name}"] = float((keep[:m] & ref[:m]).sum() / ref[:m].sum())
  return out


def main(argv=None) -> dict:
  cpu = cifar10_cpu.get_config().backselect
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=8, help="sampled test images")
  parser.add_argument("--switch", type=float, nargs="+", default=[0.1, 0.2],
                      help="hybrid switch fractions")
  parser.add_argument("--exact-images", type=int, default=0,
                      help="images also ranked by exact backward selection (~9 min each on "
                           "a 2-core CPU); 0 = skip")
  parser.add_argument("--remove-per-step", type=int, default=int(cpu.remove_per_step),
                      help="gradient pixels per step (default: configs/cifar10_cpu.py's)")
  parser.add_argument("--batch-size", type=int, default=int(cpu.batch_size),
                      help="gradient images per pass (default: configs/cifar10_cpu.py's)")
  parser.add_argument("--seed", type=int, default=0, help="seed of the image sample")
  parser.add_argument("--out", default="", help="write the results here as JSON")
  args = parser.parse_args(argv)
  if args.images < 1 or not 0 <= args.exact_images <= args.images:
    parser.error("--images must be >= 1 and --exact-images in [0, --images].")

  module, variables = shipped.pretrained(MODEL)
  apply = lambda v, x: module.apply(v, x, train=False)
  predict = jax.jit(lambda x: apply(variables, x))
  images, _ = sample(args.images, args.seed)
  n, d = len(images), images.shape[1] * images.shape[2]
  k = args.remove_per_step
  clock = CompileClock()
  common = dict(params=variables)
  grad_kw = dict(common, remove_per_step=k, batch_size=args.batch_size)
  out = {"model": MODEL, "backend": jax.default_backend(), "devices": len(jax.devices()),
         "images": n, "features": d, "remove_per_step": k, "gradient_batch": args.batch_size,
         "frac_kept": FRAC_KEPT, "kept_features": int(math.ceil(round(FRAC_KEPT * d, 9))),
         "threshold": TAU, "methods": {}}

  result, seconds, compile_s = timed(
      clock, lambda: sis.gradient_backselect(apply, images, **grad_kw))
  targets = result.target_classes
  out["confidence_full_image"] = float(result.original_scores.mean())
  keeps = {"gradient": sis.keep_mask(result.order, FRAC_KEPT)}
  # (name, order, seconds, compile seconds, images, evaluations, gradient passes)
  rows = [("gradient", result.order, seconds, compile_s, n, 0, -(-d // k) + 1)]
  if args.exact_images:
    x = images[:args.exact_images]
    result, seconds, compile_s = timed(clock, lambda: sis.batched_backselect(
        apply, x, params=variables, target_classes=targets[:len(x)]))
    keeps["exact"] = sis.keep_mask(result.order, FRAC_KEPT)
    rows.append(("exact", result.order, seconds, compile_s, len(x), d * (d + 1) // 2, 0))
  for switch in args.switch:
    r = sis.exact_features(d, switch)
    result, seconds, compile_s = timed(clock, lambda: sis.hybrid_backselect(
        apply, images, switch_fraction=switch, target_classes=targets, **grad_kw))
    name = f"hybrid_{switch:g}"
    keeps[name] = sis.keep_mask(result.order, FRAC_KEPT)
    rows.append((name, result.order, seconds, compile_s, n, r * (r + 1) // 2,
                 (-(-(d - r) // k) + 1) if r < d else 0))
  for name, order, seconds, compile_s, m, evals, passes in rows:
    conf = confidence(predict, images[:m], order, targets[:m])
    refs = {ref: keeps[ref] for ref in ("gradient", "exact") if ref in keeps and ref != name}
    row = out["methods"][name] = summary(seconds, compile_s, m, evals, passes, conf,
                                         keeps[name], refs)
    row["confidence_per_image"] = [float(c) for c in conf]
    if args.exact_images:  # the same images as exact's, for a like-for-like comparison
      e = conf[:args.exact_images]
      row["on_exact_images"] = {"images": int(len(e)), "mean_confidence_5pct": float(e.mean()),
                                "fraction_at_least_tau": float((e >= TAU).mean())}
    print(f"{name:>12}: {row['seconds_per_image']:8.2f} s/image (+{compile_s:.1f} s "
          f"compiling), 5% subsets: mean confidence {row['mean_confidence_5pct']:.3f}, "
          f"≥ {TAU}: {row['fraction_at_least_tau']:.0%} ({m} images)")
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(out, fh, indent=1)
  return out


if __name__ == "__main__":
  main()
