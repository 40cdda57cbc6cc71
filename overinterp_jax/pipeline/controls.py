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
The controls read the SIS sample, its models and records through ``ctx.sis_sample``
(``sis_sample.SisSample``). Figures (``draw_figures``): the smoothed control's
confidences and the confidence rise along the selection.
"""
from __future__ import annotations

import numpy as np

from overinterp_jax import sis
from overinterp_jax.data import loader
from overinterp_jax.pipeline import (figures, gradient_check, registry, report_sections,
                                     sis_stats, trained)
from overinterp_jax.pipeline.masked_data import dilate
from overinterp_jax.selection import records
from overinterp_jax.store import hashing, npz

# 2: the smoothed and masking-value controls use a seeded random sample of test images.
_VERSION = 2
FIGURES = {"smoothed_sis": "figures/smoothed_sis_confidence.png",
           "confidence_rise": "figures/confidence_rise.png"}


def smoothed_key(summary: dict) -> str:
  """The key of ``controls/smoothed.npz``: the smoothed control's summary (in the stage's
  marker) it belongs to."""
  return hashing.fingerprint(summary, _VERSION)


def target_confidence(ctx, apply, variables, images, targets) -> np.ndarray:
  if len(targets) == 0:
    return np.zeros((0,), np.float64)
  logits = ctx.predict_logits(apply, variables, images)
  return trained.softmax(logits.astype(np.float64))[np.arange(len(targets)), targets]


def _smoothed_source(ctx, apply, variables, indices, rec, fmap, tau, k, sample):
  """The smoothed control on the records ``rec`` of the test images ``indices`` (the
  sample named ``sample``: "SIS sample" or "test sample"): its summary and the target
  confidences on the SISes and on the dilated SISes."""
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
  summary = {"sample": sample, "images": int(len(indices)), "count": int(keep.sum()),
             "dilation": k,
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
  return f"{name} (test sample)" if ctx.sis_sample.reuses_backselect() else name


def smoothed(ctx) -> tuple[dict, dict]:
  c = ctx.config
  tau, k = float(c.sis.threshold), int(c.controls.dilation)
  out, arrays = {}, {}
  indices = ctx.sis_sample.indices()
  for name in c.sis.models:
    apply, variables, _, _ = ctx.sis_sample.predictor(name)
    rec = ctx.sis_sample.records(name)
    s, a, b = _smoothed_source(ctx, apply, variables, indices, rec,
                               ctx.sis_sample.feature_map(), tau, k, "SIS sample")
    row = f"{ctx.sis_sample.selection_name()}/{name}"
    out[row], arrays[f"{row}/sis"], arrays[f"{row}/dilated"] = s, a, b
  sample = ctx.sis_sample.test_sample(int(c.controls.smoothed_images))
  rec = ctx.backselect("test").rows(sample)
  s, a, b = _smoothed_source(ctx, ctx.base.apply, ctx.base.variables, sample, rec, None, tau, k,
                             "test sample")
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
  sample = ctx.sis_sample
  indices = sample.indices()
  own = sample.records("single")
  wrong = wrong_targets(own["targets"], int(c.model.num_classes), int(c.controls.target_seed))
  rec = sample.select("targeted_single", ctx.base.apply, ctx.base.variables, ctx.base_fp,
                      target_classes=wrong)
  ppf = sample.pixels_per_feature()
  num_pixels = int(np.prod(ctx.height_width))
  reached = rec["values"].max(axis=1) >= tau
  sizes = records.sis_length(rec["values"], tau) * ppf
  own_sis = sis_stats.sis_of(own, tau)
  return {
      "num_images": int(len(indices)),
      "wrong_class": {"fraction_reached_threshold": float(reached.mean()),
                      "fraction_fully_masked_reaches": float((rec["values"][:, -1] >= tau).mean()),
                      "median_max_confidence": float(np.median(rec["values"].max(axis=1))),
                      "median_full_image_confidence": float(np.median(rec["original_scores"])),
                      **sis_stats.size_stats(sizes, reached, num_pixels)},
      "predicted_class": sis_stats.size_stats(own_sis.size * ppf, own_sis.exists, num_pixels)}


def masking_values(ctx) -> dict:
  c = ctx.config
  tau = float(c.sis.threshold)
  sis_sample = ctx.sis_sample
  num_pixels = int(np.prod(ctx.height_width))
  sample = sis_sample.test_sample(int(c.controls.masking_test_images))
  ppf = sis_sample.pixels_per_feature()
  out = {}
  for kind in c.controls.masking_values:
    if kind == "mean":
      rec = sis_sample.records("single")
      bs = ctx.backselect("test").rows(sample)
    else:
      rec = sis_sample.select(f"single_mask_{kind}", ctx.base.apply, ctx.base.variables,
                              ctx.base_fp, masking=kind)
      bs = ctx.backselect("test", tuple(sample.tolist()), kind).everything()
    batch = sis_stats.sis_of(rec, tau)
    keep = records.keep_last_removed(bs["order"], ctx.kept_count(),
                                     int(np.prod(ctx.height_width))).reshape(
                                         -1, *ctx.height_width)
    fill = (None if kind == "mean" else
            lambda local, kind=kind: ctx.fully_masked("test", kind, sample[local]))
    images = ctx.feed("test").subset(sample).with_masks(loader.PackedMasks.from_masks(keep),
                                                        fill=fill)
    logits = ctx.predict_logits(ctx.base.apply, ctx.base.variables, images)
    out[kind] = {"sis": sis_stats.size_stats(batch.size * ppf, batch.exists, num_pixels),
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
    rec = ctx.sis_sample.records(name)
    out[f"{ctx.sis_sample.selection_name()}/{name}"] = rise_fraction(rec["values"].max(axis=1),
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


def draw_figures(ctx, s: dict) -> dict:
  """The controls' figures (``s``: the stages' summaries): the smoothed control's confidences
  on each SIS and its dilation (from ``controls/smoothed.npz``), and how confidence rises
  along the selection. ``{name: path}`` of the files written."""
  made = {}
  tau = float(ctx.config.sis.threshold)
  c = s.get("controls", {})
  if "smoothed" in c:
    arrays = npz.load(ctx.path("controls", "smoothed.npz"), smoothed_key(c["smoothed"]))
    if arrays is not None:
      titles = smoothed_titles(ctx, c["smoothed"])
      before = {titles[k]: arrays[f"{k}/sis"] for k in c["smoothed"]}
      after = {titles[k]: arrays[f"{k}/dilated"] for k in c["smoothed"]}
      made["smoothed_sis"] = figures.paired_confidence(
          ctx.path(FIGURES["smoothed_sis"]), before, after, threshold=tau,
          labels=("SIS", f"dilated SIS ({int(ctx.config.controls.dilation)}×"
                         f"{int(ctx.config.controls.dilation)})"))
  if "confidence_rise" in c:
    made["confidence_rise"] = _rise_figure(ctx, s)
  return made


def _rise_figure(ctx, s: dict) -> str:
  """The confidence-rise curves of the SIS sample's records and of stage backselect's on a
  test sample of ``figures.FIGURE_SAMPLE`` images."""
  values, original, label_by = {}, {}, {}
  for name in s["sis"]["models"] if s["sis"]["num_images"] else ():
    rec = ctx.sis_sample.records(name)
    row = f"{ctx.sis_sample.selection_name()}/{name}"
    values[row], original[row] = rec["values"], rec["original_scores"]
    label_by[row] = figures.sample_label(row, "SIS sample", len(rec["values"]))
  rec = ctx.backselect("test").rows(ctx.sis_sample.test_sample(figures.FIGURE_SAMPLE))
  key = backselect_row(ctx)
  values[key], original[key] = rec["values"], rec["original_scores"]
  label_by[key] = figures.sample_label(key, "test sample", len(rec["values"]))
  return figures.rise_curves(ctx.path(FIGURES["confidence_rise"]), values, original,
                             label_by=label_by)


def smoothed_titles(ctx, smoothed: dict) -> dict:
  """``{row of the smoothed control: panel title}``: the row, its sample and the sample's
  size (the SIS sample, or ``controls.smoothed_images`` test images for stage backselect's
  records), and how many of those images have a SIS when not all do."""
  sample = {backselect_row(ctx): ("test sample", len(ctx.sis_sample.test_sample(
      int(ctx.config.controls.smoothed_images))))}
  titles = {}
  for row, v in smoothed.items():
    what, n = sample.get(row, ("SIS sample", len(ctx.sis_sample.indices())))
    titles[row] = figures.sample_label(row, what, n, "\n") + (
        f"\n{v['count']:,} with a non-empty SIS" if v["count"] != n else "")
  return titles


STAGE = registry.Unit("controls", "controls", run, report_sections.controls_section,
                      draw_figures)
