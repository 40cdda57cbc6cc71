"""Stage ``controls``: tests of the overinterpretation finding itself.

A critique of the paper (Springer 2022) reads a SIS as an adversarial *mask
pattern*: backward selection searches over masks for one that raises the
target confidence. These controls let a user weigh both readings:

  * ``smoothed``: confidence on each SIS image and on the SIS dilated by a
    ``k × k`` neighbourhood (every SIS pixel kept, neighbours added). If the
    pixels carry the evidence, adding pixels should not hurt.
  * ``targeted``: backward selection toward a random *wrong* class; how often
    it reaches τ and how large those SISes are.
  * ``masking_values``: SIS sizes and the base model's 5% BS accuracy with the
    masked value set to the dataset mean (0), a blurred copy, or noise.
  * ``confidence_rise``: the fraction of images whose confidence rises above
    its full-image value during backward selection.
  * ``gradient_vs_exact``: how well Batched Gradient SIS approximates exact
    selection on the SIS sample (``gradient_check.py``).
(Mask-only leakage is the ``mask_only`` kind of the ``retrain`` stage.)
"""
from __future__ import annotations

import numpy as np

from overinterp_jax import sis
from overinterp_jax.data import loader
from overinterp_jax.pipeline import (gradient_check, registry, report_sections, sis_stage,
                                     subsets_stage, trained)
from overinterp_jax.pipeline.masked_data import dilate
from overinterp_jax.selection import records
from overinterp_jax.store import hashing, npz

# 2: the smoothed and masking-value controls use a seeded random sample of test images.
_VERSION = 2


def smoothed_key(summary: dict) -> str:
  """The key of ``controls/smoothed.npz``: the smoothed control's summary (in the stage's
  marker) it belongs to."""
  return hashing.fingerprint(summary, _VERSION)


def target_confidence(ctx, apply, variables, images, targets) -> np.ndarray:
  if len(targets) == 0:
    return np.zeros((0,), np.float64)
  logits = ctx.predict_logits(apply, variables, images)
  return trained.softmax(logits.astype(np.float64))[np.arange(len(targets)), targets]


def _smoothed_source(ctx, apply, variables, indices, rec, fmap, tau, k):
  batch = sis.sis_from_backselect(
      sis.BackselectResult(rec["targets"], rec["original_scores"], rec["order"], rec["values"]),
      tau)
  keep = batch.exists & (batch.size > 0)
  h, w = ctx.height_width
  pixels = sis.feature_mask_to_pixels(batch.mask[keep], fmap, (h, w))
  feed = ctx.feed("test").subset(indices[keep])
  targets = rec["targets"][keep]
  masked = lambda m: feed.with_masks(loader.PackedMasks.from_masks(m))
  conf_sis = target_confidence(ctx, apply, variables, masked(pixels), targets)
  dilated = dilate(pixels, k)
  conf_dil = target_confidence(ctx, apply, variables, masked(dilated), targets)
  summary = {"count": int(keep.sum()), "dilation": k,
             "median_confidence_sis": float(np.median(conf_sis)) if len(conf_sis) else None,
             "median_confidence_dilated": float(np.median(conf_dil)) if len(conf_dil) else None,
             "fraction_dilated_below_threshold": float((conf_dil < tau).mean())
             if len(conf_dil) else None,
             "median_pixels_sis": float(np.median(pixels.sum((1, 2)))) if len(pixels) else None,
             "median_pixels_dilated": float(np.median(dilated.sum((1, 2))))
             if len(pixels) else None}
  return summary, conf_sis, conf_dil


def backselect_row(ctx) -> str:
  """The label of a control's row on stage backselect's own test records (beside the rows
  of the SIS sample, labelled ``<selection>/<model>``)."""
  name = f"{ctx.config.backselect.method}/single"
  return f"{name} (test sample)" if sis_stage.reuses_backselect(ctx) else name


def smoothed(ctx) -> tuple[dict, dict]:
  c = ctx.config
  tau, k = float(c.sis.threshold), int(c.controls.dilation)
  out, arrays = {}, {}
  indices = sis_stage.sample_indices(ctx)
  for name in c.sis.models:
    apply, variables, _, _ = sis_stage.predictor(ctx, name)
    rec = sis_stage.records_for(ctx, name)
    s, a, b = _smoothed_source(ctx, apply, variables, indices, rec, sis_stage.feature_map(ctx),
                               tau, k)
    row = f"{sis_stage.selection_name(ctx)}/{name}"
    out[row], arrays[f"{row}/sis"], arrays[f"{row}/dilated"] = s, a, b
  sample = sis_stage.test_sample(ctx, int(c.controls.smoothed_images))
  rec = ctx.backselect("test").rows(sample)
  s, a, b = _smoothed_source(ctx, ctx.base.apply, ctx.base.variables, sample, rec, None, tau, k)
  name = backselect_row(ctx)
  out[name], arrays[f"{name}/sis"], arrays[f"{name}/dilated"] = s, a, b
  return out, arrays


def wrong_targets(predicted: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
  """A uniformly random class other than ``predicted`` per image (fixed seed)."""
  shift = np.random.default_rng(seed).integers(1, num_classes, size=len(predicted))
  return ((predicted + shift) % num_classes).astype(np.int32)


def targeted(ctx) -> dict:
  c = ctx.config
  tau = float(c.sis.threshold)
  indices = sis_stage.sample_indices(ctx)
  own = sis_stage.records_for(ctx, "single")
  wrong = wrong_targets(own["targets"], int(c.model.num_classes), int(c.controls.target_seed))
  rec = sis_stage.selection_records(ctx, "targeted_single", ctx.base.apply,
                                    ctx.base.variables, ctx.base_fp, indices,
                                    target_classes=wrong)
  ppf = sis_stage.pixels_per_feature(ctx)
  num_pixels = int(np.prod(ctx.height_width))
  reached = rec["values"].max(axis=1) >= tau
  sizes = records.sis_length(rec["values"], tau) * ppf
  own_sis = sis_stage.sis_of(own, tau)
  return {
      "num_images": int(len(indices)),
      "wrong_class": {"fraction_reached_threshold": float(reached.mean()),
                      "fraction_fully_masked_reaches": float((rec["values"][:, -1] >= tau).mean()),
                      "median_max_confidence": float(np.median(rec["values"].max(axis=1))),
                      "median_full_image_confidence": float(np.median(rec["original_scores"])),
                      **sis_stage.size_stats(sizes, reached, num_pixels)},
      "predicted_class": sis_stage.size_stats(own_sis.size * ppf, own_sis.exists, num_pixels)}


def masking_values(ctx) -> dict:
  c = ctx.config
  tau = float(c.sis.threshold)
  indices = sis_stage.sample_indices(ctx)
  num_pixels = int(np.prod(ctx.height_width))
  sample = sis_stage.test_sample(ctx, int(c.controls.masking_test_images))
  ppf = sis_stage.pixels_per_feature(ctx)
  out = {}
  for kind in c.controls.masking_values:
    if kind == "mean":
      rec = sis_stage.records_for(ctx, "single")
      bs = ctx.backselect("test").rows(sample)
    else:
      rec = sis_stage.selection_records(ctx, f"single_mask_{kind}", ctx.base.apply,
                                        ctx.base.variables, ctx.base_fp, indices, masking=kind)
      bs = ctx.backselect("test", tuple(sample.tolist()), kind).everything()
    batch = sis_stage.sis_of(rec, tau)
    keep = records.keep_last_removed(bs["order"], subsets_stage.kept_count(ctx),
                                     int(np.prod(ctx.height_width))).reshape(
                                         -1, *ctx.height_width)
    fill = (None if kind == "mean" else
            lambda local, kind=kind: ctx.fully_masked("test", kind, sample[local]))
    images = ctx.feed("test").subset(sample).with_masks(loader.PackedMasks.from_masks(keep),
                                                        fill=fill)
    logits = ctx.predict_logits(ctx.base.apply, ctx.base.variables, images)
    out[kind] = {"sis": sis_stage.size_stats(batch.size * ppf, batch.exists, num_pixels),
                 "base_on_bs_subsets": trained.accuracy_and_confidence(
                     logits, ctx.labels("test")[sample], bs["targets"])}
  return out


def rise_fraction(max_values: np.ndarray, original: np.ndarray) -> dict:
  """How often the highest confidence over a selection (``max_values [N]``) exceeds the
  full image's (``original [N]``)."""
  rise = max_values - original
  if not len(rise):
    return {"count": 0, "fraction_rising": None, "fraction_rising_by_0.01": None,
            "median_max_rise": None}
  return {"count": int(len(original)), "fraction_rising": float((rise > 0).mean()),
          "fraction_rising_by_0.01": float((rise > 0.01).mean()),
          "median_max_rise": float(np.median(rise))}


def confidence_rise(ctx) -> dict:
  out = {}
  for name in ctx.config.sis.models:
    rec = sis_stage.records_for(ctx, name)
    out[f"{sis_stage.selection_name(ctx)}/{name}"] = rise_fraction(rec["values"].max(axis=1),
                                                                   rec["original_scores"])
  small = ctx.backselect("test").small()
  out[backselect_row(ctx).replace("test sample", "all test images")] = rise_fraction(
      small["max_values"], small["original_scores"])
  return out


def run(ctx) -> dict:
  c = ctx.config.controls
  out = {"threshold": float(ctx.config.sis.threshold)}
  if c.smoothed:
    out["smoothed"], arrays = smoothed(ctx)
    npz.save(ctx.path("controls", "smoothed.npz"), arrays, smoothed_key(out["smoothed"]))
  if c.targeted:
    out["targeted"] = targeted(ctx)
  if c.masking_values:
    out["masking_values"] = masking_values(ctx)
  if c.confidence_rise:
    out["confidence_rise"] = confidence_rise(ctx)
  if c.gradient_vs_exact and ctx.config.sis.selection == "exact":
    out["gradient_vs_exact"] = gradient_check.run(ctx)
  return out


STAGE = registry.Unit("controls", "controls", run, report_sections.controls_section)
