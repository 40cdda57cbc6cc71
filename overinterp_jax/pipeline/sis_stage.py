"""Stage ``sis``: SISes at τ for a sample of test images, per model (paper §5).

Selection (``config.sis.selection``): ``"exact"`` backward selection of every
feature (CIFAR), ``"coarse_to_fine"``, or ``"backselect"``: the selection of stage
backselect (``config.backselect``, e.g. Batched Gradient SIS at ImageNet size), whose
test records are reused for the base model. The sample, its models
(``config.sis.models``) and its features (pixels, ``patch_size=1``, or ``p × p``
patches) are the context's ``ctx.sis_sample`` (``sis_sample.SisSample``), which reads
the records through ``selection_records``. Each model's backward-selection record is
stored in ``sis/<model>.npz`` (built from ``images_per_call`` images per compiled call,
each call's record kept in ``sis/<model>.parts/`` until the whole record is written, so
a killed run resumes at the first missing call).

Figures (``figures``): SIS examples, SIS sizes, confidence along the selection.
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, Optional

import numpy as np
from absl import logging

from overinterp_jax import config_reads, sis
from overinterp_jax.data import class_names
from overinterp_jax.pipeline import (backselect_stage, figures, record_shards, registry,
                                     report_sections, sis_stats)
from overinterp_jax.store import hashing, npz

FIGURES = {"sis_examples": "figures/sis_examples.png",
           "confidence_curves": "figures/confidence_vs_pixels_removed.png",
           "sis_sizes": "figures/sis_size_histograms.png"}


def coarse(ctx) -> bool:
  """Whether SISes come from coarse-to-fine selection (``sis.selection``)."""
  return ctx.config.sis.selection == "coarse_to_fine"


def exact_records(ctx, name: str, apply: Callable, variables, fingerprint: str,
                  indices: np.ndarray, *, masking: str = "mean", target_classes=None) -> dict:
  """Exact backward selection of test images ``indices`` -> cached ``sis/<name>.npz``.

  ``fingerprint`` identifies ``apply`` and ``variables`` (the model's key); ``masking``: the
  masked value (``masked_data.MASKING_VALUES``). The record is keyed by these, the
  images, the targets and the config values read while making it (``config_reads``).
  """
  with config_reads.recording() as reads:
    method = ctx.config.sis.selection
    # Exact records keep their key; other methods' differ from them and from each other.
    key = config_reads.Key(hashing.fingerprint(
        fingerprint, masking, indices.tolist(),
        None if target_classes is None else np.asarray(target_classes).tolist(),
        sis.SELECTION_VERSION, *([] if method == "exact" else [method])), ctx.config, reads)
    coarse_args = None
    if method == "coarse_to_fine":
      coarse_args = (float(ctx.config.sis.threshold), ctx.config.coarse_to_fine)
    fmap = ctx.sis_sample.feature_map()
    d = int(np.prod(ctx.height_width)) // ctx.sis_sample.pixels_per_feature()
    # Each method's records have their own file: switching back reuses the other's.
    if method != "exact":
      name = f"{name}.{method}"
    path = ctx.path("sis", f"{name}.npz")
    rec = npz.load(path, key, dense_check(len(indices), d))
    if rec is None:
      logging.info("%s backward selection %s: %d images, %d features.",
                   "Exact" if method == "exact" else "Coarse-to-fine", name, len(indices), d)
      fully_masked = ctx.fully_masked("test", masking, indices)
      rec = _exact_in_parts(ctx, name, apply, variables, key, indices, fmap, d,
                            fully_masked, target_classes, coarse_args)
      npz.save(path, rec, key)
      shutil.rmtree(_parts_dir(ctx, name), ignore_errors=True)
  return rec


def selection_records(ctx, name: str, apply: Callable, variables, fingerprint: str,
                      indices: np.ndarray, *, masking: str = "mean",
                      target_classes=None) -> dict:
  """Backward selection records (dense: ``order``, ``values [n, d]``, ``targets``,
  ``original_scores``) of test images ``indices`` per ``sis.selection``: ``exact_records``
  (exact or coarse-to-fine), or stage backselect's selection (``config.backselect``), whose
  own test records serve the base model toward its predictions with the mean as masked
  value."""
  if ctx.config.sis.selection in ("exact", "coarse_to_fine"):
    return exact_records(ctx, name, apply, variables, fingerprint, indices, masking=masking,
                         target_classes=target_classes)
  if name == "single" and masking == "mean" and target_classes is None:
    rec = ctx.backselect("test").rows(indices)
    return {k: v for k, v in rec.items() if k != "ids"}
  with config_reads.recording() as reads:
    key = config_reads.Key(hashing.fingerprint(
        fingerprint, masking, indices.tolist(),
        None if target_classes is None else np.asarray(target_classes).tolist(),
        sis.SELECTION_VERSION), ctx.config, reads)
    fm = None
    if masking != "mean":
      fm = lambda rows: ctx.fully_masked("test", masking, indices[rows])
    recs = backselect_stage.backselect_split(
        ctx.path("sis", name), apply, variables, ctx.feed("test"), ctx.config.backselect, key,
        seed=int(ctx.config.backselect.noise_seed) + 2 * 10**7, indices=indices, fully_masked=fm,
        target_classes=target_classes, progress=ctx.progress, desc=f"SIS selection ({name})",
        mesh=ctx.mesh, compute_dtype=ctx.config.model.precision)
  return {k: v for k, v in recs.everything().items() if k != "ids"}


def _parts_dir(ctx, name: str) -> str:
  return ctx.path("sis", f"{name}.parts")


def _exact_in_parts(ctx, name, apply, variables, key: config_reads.Key, indices, fmap, d,
                    fully_masked, target_classes, coarse_args=None) -> dict:
  """Exact backselect (coarse-to-fine with ``coarse_args = (threshold,
  config.coarse_to_fine)``), ``config.sis.images_per_call`` images per compiled call; each
  call's record is saved in ``sis/<name>.parts/`` so a killed run loses at most one call."""
  per_call = int(ctx.config.sis.images_per_call) or len(indices)
  fm = None if fully_masked is None else np.asarray(fully_masked)
  per_image_fm = fm is not None and fm.ndim == 4
  targets = None if target_classes is None else np.asarray(target_classes)
  shards = [(os.path.join(_parts_dir(ctx, name), f"part_{start:05d}.npz"),
             key.child(per_call, start),
             slice(start, min(start + per_call, len(indices))))
            for start in range(0, len(indices), per_call)]

  feed = ctx.feed("test")

  def compute(rows: slice) -> dict:
    common = dict(params=variables, fully_masked=fm[rows] if per_image_fm else fm,
                  target_classes=None if targets is None else targets[rows], mesh=ctx.mesh)
    images = feed.batch(indices[rows])[0]
    fine = None
    if coarse_args is not None:
      r, counts = backselect_stage.coarse_to_fine(apply, images, coarse_args,
                                                  return_level_counts=True, **common)
      fine = counts[:, -1]
    else:
      r = sis.batched_backselect(apply, images, feature_map=fmap, **common)
    return record_shards.encode(r.order, r.values, r.target_classes, r.original_scores,
                                [feed.source.example_id(int(i)) for i in indices[rows]], 1,
                                fine_start=fine)

  recs = backselect_stage.records_in_shards(shards, compute, d, 1,
                                            desc=f"exact SIS ({name})", progress=ctx.progress)
  return {k: v for k, v in recs.everything().items() if k != "ids"}


def dense_check(n: int, d: int) -> Callable[[dict], Optional[str]]:
  """``npz.load`` check of ``n`` decoded records (``order``, ``values [n, d]``,
  ``targets``, ``original_scores``)."""
  def check(a: dict) -> Optional[str]:
    for key, shape in (("order", (n, d)), ("values", (n, d)), ("targets", (n,)),
                       ("original_scores", (n,))):
      if key not in a or a[key].shape != shape:
        return f"{key} missing or not of shape {shape}"
    if not np.array_equal(np.sort(a["order"], axis=1), np.broadcast_to(np.arange(d), (n, d))):
      return "an order is not a permutation"
    if not np.all(np.isfinite(a["values"])):
      return "non-finite values"
    return None
  return check


def training_epochs(ctx, name: str) -> int:
  """Epochs model ``name`` trained for (each ensemble member's; 0 where not known: weights
  from a file or the shipped model; a training directory of ours says its own)."""
  c = ctx.config
  if name == "single":
    return ctx.base.epochs
  if name == "ensemble":
    return int(c.sis.ensemble_epochs) or int(c.train.num_epochs)
  return int(c.sis.input_dropout_epochs) or int(c.train.num_epochs)


def run(ctx) -> dict:
  c = ctx.config.sis
  sample = ctx.sis_sample
  tau = float(c.threshold)
  indices = sample.indices()
  num_pixels = int(np.prod(ctx.height_width))
  out = {"threshold": tau, "num_images": int(len(indices)), "selection": sample.selection_name(),
         "patch_size": int(c.patch_size), "models": {}}
  if coarse(ctx):
    cf = ctx.config.coarse_to_fine
    out["coarse_to_fine"] = {"patch_sizes": [int(p) for p in cf.patch_sizes],
                             "margin": float(cf.margin), "min_pixels": int(cf.min_pixels),
                             "how": backselect_stage.coarse_words(cf), "median_start": {}}
  if sample.restricted():
    out["qualifying"] = int(sample.qualifying().sum())
    out["only_correct"], out["min_confidence"] = bool(c.only_correct), float(c.min_confidence)
    out["all_models"] = bool(c.sample_all_models)
  boot = dict(num=int(c.bootstrap_samples), seed=int(c.bootstrap_seed))
  sizes, exists = {}, {}
  for name in c.models:
    apply, variables, fp, acc = sample.predictor(name)
    rec = selection_records(ctx, name, apply, variables, fp, indices)
    batch = sis_stats.sis_of(rec, tau)
    sizes[name], exists[name] = batch.size * sample.pixels_per_feature(), batch.exists
    if coarse(ctx):
      out["coarse_to_fine"]["median_start"][name] = float(np.median(rec["fine_start"]))
    _, confidence = sample.predictions(name)
    out["models"][name] = {
        "test_accuracy": acc, "epochs": training_epochs(ctx, name),
        "fraction_full_image_reaches_threshold": float((confidence >= tau).mean()),
        **sis_stats.size_stats(sizes[name], exists[name], num_pixels),
        "median_interval": sis_stats.median_interval(sizes[name][exists[name]], **boot)}
  if "single" in sizes:
    out["differences"] = {}
    for name in (n for n in c.models if n != "single"):
      both = exists[name] & exists["single"]
      out["differences"][name] = sis_stats.paired_difference(
          sizes[name][both], sizes["single"][both], **boot)
  return out


def draw_figures(ctx, s: dict) -> dict:
  """The SIS figures, when stage sis ran on images (``s``: the stages' summaries): a grid of
  SISes of ``report.num_figure_images`` images of the sample, the SIS sizes of each model,
  and the target confidence along the selection (with stage backselect's on a test sample
  of ``figures.FIGURE_SAMPLE`` images). ``{name: path}`` of the files written."""
  if "sis" not in s or not s["sis"]["num_images"]:
    return {}
  made = {}
  sample = ctx.sis_sample
  tau = float(ctx.config.sis.threshold)
  h, w = ctx.height_width
  n_fig = int(ctx.config.report.num_figure_images)
  idx = sample.indices()
  rows = figures.figure_rows(len(idx), n_fig)
  fmap = sample.feature_map()
  recs = {name: sample.records(name) for name in s["sis"]["models"]}
  masks, exists, sizes, curves = {}, {}, {}, {}
  for name, rec in recs.items():
    b = sis_stats.sis_of(rec, tau)
    masks[name] = sis.feature_mask_to_pixels(b.mask[rows], fmap, (h, w))
    exists[name] = b.exists[rows]
    sizes[name] = (b.size * sample.pixels_per_feature())[b.exists]
    curves[f"{sample.selection_name()}/{name}, SIS sample"] = rec["values"]
  single = next(iter(recs.values()))
  names = class_names.display_names(ctx.data.class_names)
  labels = ctx.labels("test")
  titles = [f"{names[labels[i]]}\n→ {names[t]} {p:.3f}"
            for i, t, p in zip(idx[rows], single["targets"][rows],
                               single["original_scores"][rows])]
  made["sis_examples"] = figures.sis_grid(ctx.path(FIGURES["sis_examples"]),
                                          ctx.feed("test").images(idx[rows]), masks,
                                          titles=titles, exists_by_model=exists,
                                          max_images=n_fig)
  made["sis_sizes"] = figures.size_histograms(ctx.path(FIGURES["sis_sizes"]), sizes,
                                              num_features=h * w)
  if "backselect" in s:
    curves[f"{ctx.config.backselect.method}/single, test sample"] = ctx.backselect("test").rows(
        sample.test_sample(figures.FIGURE_SAMPLE))["values"]
  made["confidence_curves"] = figures.confidence_curves(
      ctx.path(FIGURES["confidence_curves"]), curves, threshold=tau)
  return made


STAGE = registry.Unit("sis", "sis", run, report_sections.sis_section, draw_figures)
