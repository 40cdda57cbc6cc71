"""Control ``gradient_vs_exact``: why gradient subsets are weaker than exact ones.

On the SIS sample (exact records of the base model, ``sis.patch_size`` features),
Batched Gradient SIS with one feature per step is compared with exact backward
selection on the same images and features:
  * **first step**: every feature's exact single-removal effect (the target's
    log-probability with that feature alone removed) against the gradient's
    first-order estimate of it; the Spearman correlation of the two rankings per
    image (1 = the gradient orders single removals as they really are);
  * **whole selection**: the Spearman correlation of the two removal orders, the
    overlap of the kept ``subsets.frac_kept`` features, and the base model's
    confidence on each method's subset (and on a random one): how sufficient each
    method's subset is.
"""
from __future__ import annotations

import numpy as np

from overinterp_jax import sis
from overinterp_jax.data import loader
from overinterp_jax.pipeline import trained
from overinterp_jax.selection import rank_stats, records


def subset_confidence(ctx, indices, feature_mask, fmap, targets) -> np.ndarray:
  """``[n]`` the base model's target probability on test images ``indices`` keeping
  ``feature_mask [n, d]`` (the rest the mean colour)."""
  pixels = sis.feature_mask_to_pixels(feature_mask, fmap, ctx.height_width)
  feed = ctx.feed("test").subset(indices).with_masks(loader.PackedMasks.from_masks(pixels))
  logits = ctx.predict_logits(ctx.base.apply, ctx.base.variables, feed)
  return trained.softmax(logits.astype(np.float64))[np.arange(len(targets)), targets]


def single_removal_order(ctx, images: np.ndarray, targets: np.ndarray, fmap, d: int
                         ) -> np.ndarray:
  """``[n, d]`` features of each image ordered by their exact single-removal effect,
  least harmful first (highest target log-probability with that feature alone
  removed; ties: lower feature id first), as exact backward selection's first step
  ranks them."""
  order = []
  for x, t in zip(images, targets):
    presence = ~np.eye(d, dtype=bool)  # row j: every feature but j
    masked = sis.apply_feature_mask(np.broadcast_to(x, (d,) + x.shape), presence,
                                    feature_map=fmap)
    logits = ctx.predict_logits(ctx.base.apply, ctx.base.variables, masked)
    score = np.asarray(sis.log_target_probability(logits, np.full(d, t)))
    order.append(np.argsort(-score, kind="stable"))
  return np.asarray(order, np.int32)


def run(ctx) -> dict:
  """The comparison on the SIS sample (needs ``sis.selection == "exact"``)."""
  frac = float(ctx.config.subsets.frac_kept)
  tau = float(ctx.config.sis.threshold)
  fmap = ctx.sis_sample.feature_map()
  indices = ctx.sis_sample.indices()
  exact = ctx.sis_sample.records("single")
  n, d = exact["order"].shape
  if n == 0:
    return {"num_images": 0}
  targets = exact["targets"]
  images = ctx.feed("test").batch(indices)[0]
  grad_all = sis.gradient_backselect(ctx.base.apply, images, params=ctx.base.variables,
                                     feature_map=fmap, remove_per_step=d,
                                     target_classes=targets, mesh=ctx.mesh)
  first = rank_stats.spearman_per_image(grad_all.order,
                                        single_removal_order(ctx, images, targets, fmap, d))
  grad = sis.gradient_backselect(ctx.base.apply, images, params=ctx.base.variables,
                                 feature_map=fmap, remove_per_step=1, target_classes=targets,
                                 mesh=ctx.mesh)
  kept = records.pixels_to_keep(d, frac)
  keep_exact, keep_grad = (sis.keep_mask(o, frac) for o in (exact["order"], grad.order))
  rnd = sis.random_keep_mask(n, d, frac, int(ctx.config.subsets.random_test_seed))

  def stats(mask):
    conf = subset_confidence(ctx, indices, mask, fmap, targets)
    return {"mean_confidence": float(conf.mean()), "fraction_at_least_tau": float(
        (conf >= tau).mean())}

  return {"num_images": int(n), "num_features": int(d), "kept_features": int(kept),
          "first_step_spearman_median": float(np.median(first)),
          "first_step_spearman": [float(v) for v in first],
          "order_spearman_median": float(np.median(rank_stats.spearman_per_image(
              grad.order, exact["order"]))),
          "kept_overlap": float((keep_exact & keep_grad).sum(1).mean() / kept),
          "exact": stats(keep_exact), "gradient": stats(keep_grad), "random": stats(rnd)}
