"""Stage ``sis``: SISes at τ for a sample of test images, per model (paper §5).

Selection (``config.sis.selection``): ``"exact"`` backward selection of every
feature (CIFAR), or ``"backselect"``: the selection of stage backselect
(``config.backselect``, e.g. Batched Gradient SIS at ImageNet size), whose test
records are reused for the base model. The sample (``sample_indices``) can be
restricted to images the base model classifies correctly (``sis.only_correct``)
with at least ``sis.min_confidence``.

Models (``config.sis.models``):
  * ``single``: the base model;
  * ``ensemble``: mean-logit ensemble of the base model and
    ``ensemble_size - 1`` replicates trained with other seeds (optionally
    shorter, ``ensemble_epochs``);
  * ``input_dropout``: a model trained with input dropout (keep prob
    ``sis.input_dropout_keep_prob``), evaluated deterministically: logits averaged
    over ``input_dropout_samples`` fixed dropout masks (paper §6.4).
Features are pixels (``patch_size=1``) or ``p × p`` patches. Each model's
backward-selection record is stored in ``sis/<model>.npz`` (built from
``images_per_call`` images per compiled call, each call's record kept in
``sis/<model>.parts/`` until the whole record is written, so a killed run resumes
at the first missing call).
"""
from __future__ import annotations

import os
import shutil
from typing import Callable, Optional

import numpy as np
from absl import logging

from overinterp_jax import config_reads, config_schema, sis
from overinterp_jax.pipeline import (backselect_stage, record_shards, registry, report_sections,
                                     sis_stats, trained)
from overinterp_jax.selection import features
from overinterp_jax.store import hashing, npz

MODELS = config_schema.SIS_MODELS
SELECTIONS = config_schema.SIS_SELECTIONS


def coarse(ctx) -> bool:
  """Whether SISes come from coarse-to-fine selection (``sis.selection``)."""
  return ctx.config.sis.selection == "coarse_to_fine"


def selection_name(ctx) -> str:
  """How the SIS records were selected, as figures and tables label them."""
  if ctx.config.sis.selection in ("exact", "coarse_to_fine"):
    return ctx.config.sis.selection
  return ctx.config.backselect.method


def reuses_backselect(ctx) -> bool:
  """True when the base model's SIS records are stage backselect's own test records (then a
  control's separate backselect row would repeat them)."""
  return ctx.config.sis.selection == "backselect"


def test_sample(ctx, count: int) -> np.ndarray:
  """Sorted indices of ``count`` test images (0 = all), the first ``count`` of one permutation
  seeded by ``sis.sample_seed``: smaller samples are subsets of larger ones. Never the first
  ``count`` images (image folders are ordered by class)."""
  n = ctx.data.num_examples("test")
  k = n if int(count) <= 0 else min(int(count), n)
  return np.sort(test_sample_order(ctx)[:k])


def test_sample_order(ctx) -> np.ndarray:
  """``[N]`` a permutation of the test images seeded by ``sis.sample_seed``."""
  return np.random.default_rng(int(ctx.config.sis.sample_seed)).permutation(
      ctx.data.num_examples("test"))


def qualifying(ctx) -> np.ndarray:
  """``[N]`` bool: test images the SIS sample may draw from: the base model's confidence
  ``>= sis.min_confidence`` (and right when ``sis.only_correct``); with
  ``sis.sample_all_models``, every model of ``sis.models``'s."""
  c = ctx.config.sis
  names = tuple(c.models) if c.sample_all_models else ("single",)
  ok = np.ones(ctx.data.num_examples("test"), bool)
  for name in names:
    predicted, confidence = model_predictions(ctx, name)
    ok &= confidence >= float(c.min_confidence)
    if c.only_correct:
      ok &= predicted == ctx.labels("test")
  return ok


def _restricted(c) -> bool:
  return float(c.min_confidence) > 0 or c.only_correct or c.sample_all_models


def sample_indices(ctx) -> np.ndarray:
  """The test images of the SIS sample (sorted): the first ``sis.num_images`` (0 = all) of
  one seeded permutation among those ``qualifying``."""
  c = ctx.config.sis
  if not _restricted(c):
    return test_sample(ctx, int(c.num_images))
  order = test_sample_order(ctx)
  chosen = order[qualifying(ctx)[order]]
  return np.sort(chosen[:int(c.num_images)] if int(c.num_images) > 0 else chosen)


def base_predictions(ctx) -> tuple[np.ndarray, np.ndarray]:
  """``([N] predicted class, [N] softmax confidence in it)`` of the base model on each full
  test image: from stage backselect's records (their targets are the predictions) when
  ``sis.selection == "backselect"``, else by inference (computed once per run)."""
  if reuses_backselect(ctx):
    small = ctx.backselect("test").small()
    return small["targets"], small["original_scores"]
  if "single" not in ctx.sis_predictions:
    logits = ctx.predict_logits(ctx.base.apply, ctx.base.variables, ctx.feed("test"))
    p = trained.softmax(logits.astype(np.float64))
    ctx.sis_predictions["single"] = (p.argmax(-1), p.max(axis=-1))
  return ctx.sis_predictions["single"]


def model_predictions(ctx, name: str) -> tuple[np.ndarray, np.ndarray]:
  """``([N] predicted class, [N] confidence)`` of SIS model ``name`` on the full test
  images."""
  if name == "single":
    return base_predictions(ctx)
  predictor(ctx, name)  # computes them with the model's test accuracy
  return ctx.sis_predictions[name]


def feature_map(ctx) -> Optional[np.ndarray]:
  """``[H, W]`` feature ids of ``p × p`` patches (``config.sis.patch_size``), or None for
  pixels."""
  return patch_feature_map(int(ctx.config.sis.patch_size), ctx.height_width)


def patch_feature_map(p: int, height_width) -> Optional[np.ndarray]:
  """``[H, W]`` feature ids of ``p × p`` patches, or None for ``p == 1`` (pixels);
  ValueError naming ``config.sis.patch_size`` unless ``p`` divides both sides."""
  h, w = height_width
  if p == 1:
    return None
  if h % p or w % p:
    raise ValueError(f"config.sis.patch_size={p} must divide the image size {h}x{w}.")
  return features.patch_feature_map(h, w, p)


def pixels_per_feature(ctx) -> int:
  return int(ctx.config.sis.patch_size) ** 2


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
    fmap = feature_map(ctx)
    d = int(np.prod(ctx.height_width)) // pixels_per_feature(ctx)
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


def sis_of(rec: dict, threshold: float) -> sis.SISBatch:
  return sis.sis_from_backselect(
      sis.BackselectResult(rec["targets"], rec["original_scores"], rec["order"], rec["values"]),
      threshold)


def size_stats(sizes_px: np.ndarray, exists: np.ndarray, num_pixels: int) -> dict:
  s = sizes_px[exists]
  if len(s) == 0:
    return {"count": 0, "fraction_with_sis": 0.0}
  q1, med, q3 = np.percentile(s, [25, 50, 75])
  return {"count": int(len(s)), "fraction_with_sis": float(exists.mean()),
          "median_pixels": float(med), "q1_pixels": float(q1), "q3_pixels": float(q3),
          "median_percent": float(100 * med / num_pixels),
          "mean_percent": float(100 * s.mean() / num_pixels)}


def ensemble_members(ctx) -> list:
  c = ctx.config
  members = [ctx.base]
  epochs = int(c.sis.ensemble_epochs) or int(c.train.num_epochs)
  for i in range(1, int(c.sis.ensemble_size)):
    members.append(ctx.train_model(f"ensemble_member_{i}", trained.variant(
        c, {"train.seed": int(c.train.seed) + i, "train.num_epochs": epochs})))
  return members


def input_dropout_model(ctx) -> trained.Trained:
  c = ctx.config
  epochs = int(c.sis.input_dropout_epochs) or int(c.train.num_epochs)
  return ctx.train_model("input_dropout_model", trained.variant(
      c, {"model.input_keep_prob": float(c.sis.input_dropout_keep_prob),
          "train.num_epochs": epochs}))


def predictor(ctx, name: str):
  """``(apply, variables, fingerprint, test_accuracy)`` of SIS model ``name``, built once per run
  (the ensemble's and input-dropout model's test-set evaluation is not repeated)."""
  if name not in ctx.sis_predictors:
    ctx.sis_predictors[name] = _build_predictor(ctx, name)
  return ctx.sis_predictors[name]


def _build_predictor(ctx, name: str):
  c = ctx.config.sis
  if name == "single":
    return ctx.base.apply, ctx.base.variables, ctx.base_fp, ctx.base.metrics["accuracy"]
  if name == "ensemble":
    members = ensemble_members(ctx)
    key = ("ensemble", ctx.base.apply)
    if key not in ctx.sis_applies:
      ctx.sis_applies[key] = trained.ensemble_apply(ctx.base.apply)
    apply = ctx.sis_applies[key]
    stacked = trained.stack_variables(members)
    fp = hashing.fingerprint("ensemble", [m.key for m in members])
    logits = ctx.predict_logits(apply, stacked, ctx.feed("test"))
    acc = _keep_predictions(ctx, name, logits)
    return apply, stacked, fp, acc
  if name == "input_dropout":
    model = input_dropout_model(ctx)
    key = ("input_dropout", model.module, int(c.input_dropout_samples),
           int(c.input_dropout_seed))
    if key not in ctx.sis_applies:
      ctx.sis_applies[key] = trained.input_dropout_apply(model, int(c.input_dropout_samples),
                                                         int(c.input_dropout_seed))
    apply = ctx.sis_applies[key]
    # the model's key and the arguments of its apply function
    fp = hashing.fingerprint("input_dropout", model.key, int(c.input_dropout_samples),
                             int(c.input_dropout_seed))
    logits = ctx.predict_logits(apply, model.variables, ctx.feed("test"))
    acc = _keep_predictions(ctx, name, logits)
    return apply, model.variables, fp, acc
  raise ValueError(f"config.sis.models: unknown model {name!r}; known: {list(MODELS)}.")


def _keep_predictions(ctx, name: str, logits: np.ndarray) -> float:
  """Caches model ``name``'s predictions and confidences on the test images from its
  ``logits [N, K]``; returns its test accuracy."""
  p = trained.softmax(logits.astype(np.float64))
  ctx.sis_predictions[name] = (p.argmax(-1), p.max(axis=-1))
  return float((p.argmax(-1) == ctx.labels("test")).mean())


def training_epochs(ctx, name: str) -> int:
  """Epochs model ``name`` trained for (each ensemble member's; 0 where not known: weights
  from a file or the shipped model; a training directory of ours says its own)."""
  c = ctx.config
  if name == "single":
    return ctx.base.epochs
  if name == "ensemble":
    return int(c.sis.ensemble_epochs) or int(c.train.num_epochs)
  return int(c.sis.input_dropout_epochs) or int(c.train.num_epochs)


def records_for(ctx, name: str) -> dict:
  """The stored exact record of SIS model ``name`` (stage ``sis``'s result)."""
  with ctx.owned_by("sis"):
    apply, variables, fp, _ = predictor(ctx, name)
    return selection_records(ctx, name, apply, variables, fp, sample_indices(ctx))


def run(ctx) -> dict:
  c = ctx.config.sis
  tau = float(c.threshold)
  indices = sample_indices(ctx)
  num_pixels = int(np.prod(ctx.height_width))
  out = {"threshold": tau, "num_images": int(len(indices)), "selection": selection_name(ctx),
         "patch_size": int(c.patch_size), "models": {}}
  if coarse(ctx):
    cf = ctx.config.coarse_to_fine
    out["coarse_to_fine"] = {"patch_sizes": [int(p) for p in cf.patch_sizes],
                             "margin": float(cf.margin), "min_pixels": int(cf.min_pixels),
                             "how": backselect_stage.coarse_words(cf), "median_start": {}}
  if _restricted(c):
    out["qualifying"] = int(qualifying(ctx).sum())
    out["only_correct"], out["min_confidence"] = bool(c.only_correct), float(c.min_confidence)
    out["all_models"] = bool(c.sample_all_models)
  boot = dict(num=int(c.bootstrap_samples), seed=int(c.bootstrap_seed))
  sizes, exists = {}, {}
  for name in c.models:
    apply, variables, fp, acc = predictor(ctx, name)
    rec = selection_records(ctx, name, apply, variables, fp, indices)
    batch = sis_of(rec, tau)
    sizes[name], exists[name] = batch.size * pixels_per_feature(ctx), batch.exists
    if coarse(ctx):
      out["coarse_to_fine"]["median_start"][name] = float(np.median(rec["fine_start"]))
    _, confidence = model_predictions(ctx, name)
    out["models"][name] = {
        "test_accuracy": acc, "epochs": training_epochs(ctx, name),
        "fraction_full_image_reaches_threshold": float((confidence >= tau).mean()),
        **size_stats(sizes[name], exists[name], num_pixels),
        "median_interval": sis_stats.median_interval(sizes[name][exists[name]], **boot)}
  if "single" in sizes:
    out["differences"] = {}
    for name in (n for n in c.models if n != "single"):
      both = exists[name] & exists["single"]
      out["differences"][name] = sis_stats.paired_difference(
          sizes[name][both], sizes["single"][both], **boot)
  return out


STAGE = registry.Unit("sis", "sis", run, report_sections.sis_section)
