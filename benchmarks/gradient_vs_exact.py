"""How close is Batched Gradient SIS to exact backward selection? (Run after the `sis` stage.)

On the `sis` stage's sample of test images, with the base model of a pipeline
work directory, compares the exact record (``sis/single.npz``, the stage's
feature map) with gradient backselect on the same features at several k:
  * overlap of the kept 5% features (last-removed ⌈0.05·d⌉);
  * the base model's target confidence on each method's 5% subset (and on a
    random 5% subset), i.e. how "sufficient" each subset is;
  * Spearman correlation of the removal positions.
Also, at pixel level, the 5% subsets of the pipeline's k against k = 32, 8 and 1.

  python benchmarks/gradient_vs_exact.py --config=configs/cifar10_cpu.py \\
      --workdir=workdirs/cifar10_cpu --out=benchmarks/results/gradient_vs_exact_cpu.json
"""
from __future__ import annotations

import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from overinterp_jax.selection.rank_stats import spearman as _spearman
from overinterp_jax import sis
from overinterp_jax.pipeline import gradient_check, sis_stage
import workdir_script

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Pipeline config.", lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory with finished train and sis stages.")
flags.DEFINE_string("out", "", "Write the results here as JSON.")
flags.DEFINE_integer("num_images", 0, "Test images to compare (0 = the sis stage's sample). "
                     "Another number draws the same seeded permutation and stores its exact "
                     "records as sis/single_sample<N>.npz, beside the stage's own.")


def _stats(conf: np.ndarray, tau: float) -> dict:
  """Target confidence on the 5% subsets: mean, median, fraction ≥ τ."""
  return {"mean_confidence_5pct": float(conf.mean()),
          "median_confidence_5pct": float(np.median(conf)),
          "fraction_at_least_tau": float((conf >= tau).mean())}


def compare(ctx) -> dict:
  frac = float(ctx.config.subsets.frac_kept)
  tau = float(ctx.config.sis.threshold)
  fmap = sis_stage.feature_map(ctx)
  if FLAGS.num_images:
    idx = sis_stage.test_sample(ctx, FLAGS.num_images)
    exact = sis_stage.exact_records(ctx, f"single_sample{FLAGS.num_images}", ctx.base.apply,
                                    ctx.base.variables, ctx.base_fp, idx)
  else:
    idx = sis_stage.sample_indices(ctx)
    exact = sis_stage.records_for(ctx, "single")
  d = exact["order"].shape[1]
  images = ctx.data.prepare(ctx.data.test_images[idx])
  targets = exact["targets"]
  keep_exact = sis.keep_mask(exact["order"], frac)
  out = {"num_images": int(len(idx)), "num_features": int(d),
         "kept_features": int(keep_exact[0].sum()),
         "confidence_full_image": float(np.mean(exact["original_scores"])),
         "threshold": tau,
         "exact": _stats(gradient_check.subset_confidence(ctx, idx, keep_exact, fmap, targets), tau)}
  rnd = sis.random_keep_mask(len(idx), d, frac, 5678)
  out["random"] = _stats(gradient_check.subset_confidence(ctx, idx, rnd, fmap, targets), tau)
  pipeline_k = int(ctx.config.backselect.remove_per_step)
  ks = sorted({1, max(1, pipeline_k * d // int(np.prod(ctx.height_width))), 8, 32})
  for k in ks:
    g = sis.gradient_backselect(ctx.base.apply, images, params=ctx.base.variables,
                                feature_map=fmap, remove_per_step=k, target_classes=targets,
                                mesh=ctx.mesh)
    keep = sis.keep_mask(g.order, frac)
    out[f"gradient_k{k}"] = {
        "overlap_with_exact": float((keep & keep_exact).sum(1).mean() / keep_exact[0].sum()),
        "spearman_with_exact": _spearman(g.order, exact["order"]),
        **_stats(gradient_check.subset_confidence(ctx, idx, keep, fmap, targets), tau)}
  # Pixel level: the pipeline's k against finer k on the same images.
  pix = {}
  for k in sorted({pipeline_k, 32, 8, 1}):
    g = sis.gradient_backselect(ctx.base.apply, images, params=ctx.base.variables,
                                remove_per_step=k, target_classes=targets, mesh=ctx.mesh)
    pix[k] = sis.keep_mask(g.order, frac)
  ref = pix[min(pix)]
  out["pixels"] = {f"k{k}": {
      "overlap_with_k{}".format(min(pix)): float((m & ref).sum(1).mean() / ref[0].sum()),
      **_stats(gradient_check.subset_confidence(ctx, idx, m, None, targets), tau)}
      for k, m in pix.items()}
  return out


def main(argv):
  del argv
  workdir_script.run(compare)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  sys.path.insert(0, ".")
  app.run(main)
