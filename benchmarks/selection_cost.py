"""What cheaper per-pixel selections cost, and how close their SISes and 5% subsets come
to exact backward selection's (CPU-sized; the successor of ``hybrid_cost.py``).

On the shipped ResNet-20 (``resnet20_cifar10``) and the first ``--images`` of the seeded
draw of confidently classified test images of ``exact_orders.py`` (whose first images have
stored exact references: ``--refs``), for each method:
  * seconds per image (wall time less XLA compilation, reported apart) and model
    evaluations per image (gradient passes apart);
  * SIS sizes at τ = 0.99, the fraction of images with a SIS that reaches τ (recomputed:
    the model on the SIS alone), and on the images with exact references the ratio of each
    image's SIS size to exact selection's;
  * the model's confidence on each image's own 5% subset (52 pixels, the rest at the mean).
Methods: coarse-to-fine (``sis.coarse_to_fine_backselect``, margin 1, at least 64 pixels)
on every image; coarse-to-fine at each of ``--margins`` on the reference images; the hybrid
of a fixed switch (``--switch``) and Batched Gradient SIS (k = 8) on every image; exact
selection from the stored references. The gradient trajectory's own SIS sizes (where it
falls below τ) show why the gradient cannot place exact selection's start.

  python benchmarks/selection_cost.py --images 48 --out benchmarks/results/selection_cost_cpu.json
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [p for p in (ROOT, os.path.dirname(os.path.abspath(__file__))) if p not in sys.path]

from exact_orders import TAU, confident_sample  # noqa: E402
from hybrid_cost import CompileClock  # noqa: E402
from overinterp_jax import sis  # noqa: E402
from overinterp_jax.models import shipped  # noqa: E402

MODEL = "resnet20_cifar10"
FRAC_KEPT = 0.05
REFS = os.path.join(ROOT, "benchmarks", "results", "exact_orders_resnet20")


def load_refs(folder: str, indices: np.ndarray) -> list[dict]:
  """The stored exact records of the first images of the draw, checked against it."""
  refs = [dict(np.load(f)) for f in sorted(glob.glob(os.path.join(folder, "image_*.npz")))]
  for r, i in zip(refs, indices):
    if int(r["index"]) != int(i):
      raise ValueError(f"{folder}: reference of slice image {int(r['index'])} where the draw "
                       f"has {int(i)}; run exact_orders.py with the same --seed.")
  return refs[:len(indices)]


class Judge:
  """The model on the inputs a method keeps: SIS checks and 5% subsets."""

  def __init__(self, predict, images, targets, scores):
    self.predict, self.images, self.targets, self.scores = predict, images, targets, scores

  def confidence(self, rows, keep) -> np.ndarray:
    masked = sis.apply_feature_mask(self.images[rows], keep)
    probs = np.asarray(jax.nn.softmax(self.predict(masked), axis=-1))
    return probs[np.arange(len(keep)), self.targets[rows]]

  def row(self, rows, order, values, seconds, compile_s, evals, refs_sizes) -> dict:
    """One method's numbers on images ``rows`` (a slice of the draw)."""
    n = len(order)
    res = sis.BackselectResult(self.targets[rows], self.scores[rows], order, values)
    got = sis.sis_from_backselect(res, TAU)
    on_sis = self.confidence(rows, got.mask)
    conf5 = self.confidence(rows, sis.keep_mask(order, FRAC_KEPT))
    out = {"images": n, "seconds_per_image": seconds / n, "compile_seconds": compile_s,
           "model_evaluations_per_image": float(np.mean(evals)),
           "sis_sizes": got.size.tolist(), "median_sis": float(np.median(got.size)),
           "fraction_sis_reaches_tau": float(np.mean(got.exists & (on_sis >= TAU))),
           "mean_confidence_5pct": float(conf5.mean()),
           "fraction_5pct_at_least_tau": float((conf5 >= TAU).mean()),
           "confidence_5pct": conf5.tolist()}
    m = min(n, len(refs_sizes))
    if m:
      ratio = got.size[:m] / np.asarray(refs_sizes[:m])
      out.update(shared_images=m, size_ratio_to_exact=ratio.tolist(),
                 mean_size_ratio_to_exact=float(ratio.mean()),
                 median_size_ratio_to_exact=float(np.median(ratio)),
                 mean_sis_shared=float(got.size[:m].mean()),
                 mean_confidence_5pct_shared=float(conf5[:m].mean()))
    return out


def timed(clock, run):
  before, t0 = clock.seconds, time.perf_counter()
  result = run()
  compile_s = clock.seconds - before
  return result, time.perf_counter() - t0 - compile_s, compile_s


def plot(out: dict, path: str) -> None:
  """Two panels: each method's SIS sizes against exact selection's on the reference images,
  and its cost (evaluations per image, log scale) against its mean 5%-subset confidence."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  methods = out["methods"]
  exact = np.asarray(methods["exact"]["sis_sizes"])
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4.2))
  for name, row in methods.items():
    if name == "exact" or "size_ratio_to_exact" not in row:
      continue
    m = row["shared_images"]
    a.scatter(exact[:m], row["sis_sizes"][:m], label=f"{name} (n = {m})", s=25)
    evals = max(row["model_evaluations_per_image"], 1.0)
    b.scatter(evals, row["mean_confidence_5pct"], s=40)
    b.annotate(f"{name} (n = {row['images']})", (evals, row["mean_confidence_5pct"]),
               fontsize=7, xytext=(4, -10), textcoords="offset points")
  a.plot([8, 1024], [8, 1024], color="grey", lw=0.8, ls="--", label="equal")
  a.set(xscale="log", yscale="log", xlim=(8, 1024), ylim=(8, 1024),
        xlabel="exact selection's SIS (pixels)", ylabel="method's SIS (pixels)",
        title="SIS size at τ = 0.99, same images")
  a.legend(fontsize=7, loc="lower right")
  e = methods["exact"]
  b.scatter(e["model_evaluations_per_image"], e["mean_confidence_5pct"], s=40, color="k")
  b.annotate(f"exact (n = {e['images']})", (e["model_evaluations_per_image"],
             e["mean_confidence_5pct"]), fontsize=7, xytext=(-50, 8), textcoords="offset points")
  b.set(xscale="symlog", xlabel="model evaluations per image (gradient passes apart; "
                                "the gradient at 1)",
        ylabel="mean confidence on own 5% subset", ylim=(0, 1.02),
        title="cost and 5% subsets")
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=48)
  parser.add_argument("--refs", default=REFS, help="exact_orders.py's folder")
  parser.add_argument("--margins", type=float, nargs="*", default=[1.5, 2.0],
                      help="more coarse-to-fine margins, run on the reference images only")
  parser.add_argument("--switch", type=float, default=0.1, help="the hybrid's fixed switch")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="")
  parser.add_argument("--figure", default="", help="also draw the results here (PNG)")
  parser.add_argument("--plot-only", default="",
                      help="draw --figure from this earlier --out JSON and stop")
  args = parser.parse_args(argv)
  if args.plot_only:
    with open(args.plot_only) as fh:
      plot(json.load(fh), args.figure)
    return {}
  module, variables = shipped.pretrained(MODEL)
  apply = lambda v, x: module.apply(v, x, train=False)
  predict = jax.jit(lambda x: apply(variables, x))
  idx, images, targets, scores = confident_sample(args.images, args.seed)
  refs = load_refs(args.refs, idx)
  n, m = len(images), len(refs)
  judge, clock = Judge(predict, images, targets, scores), CompileClock()
  exact = sis.BackselectResult(targets[:m], scores[:m], np.stack([r["order"] for r in refs]),
                               np.stack([r["values"] for r in refs]))
  exact_sizes = sis.sis_from_backselect(exact, TAU).size.tolist()
  out = {"model": MODEL, "backend": jax.default_backend(), "images": n, "reference_images": m,
         "threshold": TAU, "frac_kept": FRAC_KEPT, "slice_indices": idx.tolist(),
         "date": time.strftime("%Y-%m-%d %H:%M"), "load_average_at_start": os.getloadavg()[0],
         "methods": {}}
  rows = slice(0, m)
  out["methods"]["exact"] = judge.row(
      rows, exact.order, exact.values, float(sum(float(r["seconds"]) for r in refs)), 0.0,
      [1024 * 1025 // 2] * m, exact_sizes)
  common = dict(params=variables, target_classes=targets)

  def c2f(margin, rows):
    (res, counts), s, c = timed(clock, lambda: sis.coarse_to_fine_backselect(
        apply, images[rows], threshold=TAU, margin=margin, min_pixels=64,
        return_level_counts=True, params=variables, target_classes=targets[rows]))
    evals = (counts * (counts + 1) // 2).sum(axis=1)
    row = judge.row(rows, res.order, res.values, s, c, evals, exact_sizes)
    row["median_level_starts"] = np.median(counts, axis=0).tolist()
    return row

  out["methods"]["coarse_to_fine m=1"] = c2f(1.0, slice(0, n))
  print(json.dumps({k: v for k, v in out["methods"]["coarse_to_fine m=1"].items()
                    if not isinstance(v, list)}), flush=True)
  for margin in args.margins:
    out["methods"][f"coarse_to_fine m={margin:g}"] = c2f(margin, rows)
  r = sis.exact_features(1024, args.switch)
  hyb, s, c = timed(clock, lambda: sis.hybrid_backselect(
      apply, images, switch_fraction=args.switch, remove_per_step=8, batch_size=64, **common))
  out["methods"][f"hybrid switch {args.switch:g} (k=8)"] = judge.row(
      slice(0, n), hyb.order, hyb.values, s, c, [r * (r + 1) // 2] * n, exact_sizes)
  grad, s, c = timed(clock, lambda: sis.gradient_backselect(
      apply, images, remove_per_step=8, batch_size=64, **common))
  out["methods"]["gradient (k=8)"] = judge.row(slice(0, n), grad.order, grad.values, s, c,
                                               [0] * n, exact_sizes)
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(out, fh, indent=1)
  if args.figure:
    plot(out, args.figure)
  for name, row in out["methods"].items():
    print(f"{name:<28} {row['images']:>3} img {row['seconds_per_image']:8.2f} s/img "
          f"{row['model_evaluations_per_image']:>9,.0f} evals  median SIS {row['median_sis']:5.1f}"
          f"  reaches τ {row['fraction_sis_reaches_tau']:.2f}  5%: {row['mean_confidence_5pct']:.3f}"
          f"  size/exact {row.get('mean_size_ratio_to_exact', float('nan')):.2f}")
  return out


if __name__ == "__main__":
  main()
