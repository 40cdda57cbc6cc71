"""Stage ``backselect``: backward selection of every train and test image, in shards.

Shard ``i`` of a split holds images ``[i·S, (i+1)·S)`` (``S = shard_size``) in the
compact form of ``record_shards`` (removal rank per pixel in the smallest integer
type, one confidence per step, example ids). Images are read through the input
pipeline shard by shard; shards are written atomically and validated on read
(fingerprint, checksum, shapes, every rank row a permutation), so a re-run
computes only the shards that are missing or invalid, and later stages read
them back as a stream (``record_shards.RecordSet``). Method ``"exact"`` is ``sis.batched_backselect``;
``"gradient"`` is ``sis.gradient_backselect`` (Batched Gradient SIS); ``"hybrid"`` is
``sis.hybrid_backselect`` (Batched Gradient SIS, then exact backward selection of the last
``backselect.switch_fraction`` of the pixels), stored like exact records (``per_step``).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

import jax
import numpy as np
from absl import logging

from overinterp_jax import config_reads, config_schema, precision, sis
from overinterp_jax.data import loader
from overinterp_jax.pipeline import record_shards, registry
from overinterp_jax.progress import progress_bar
from overinterp_jax.store import atomic, hashing, npz

SPLITS = ("train", "test")
METHODS = config_schema.BACKSELECT_METHODS  # config.backselect.method


def run_backselect(apply: Callable, variables, images: np.ndarray, bs_config, *,
                   seed: int, fully_masked=None, target_classes=None, mesh=None,
                   compute_dtype: str = "float32", coarse=None,
                   fitted: Optional[dict] = None) -> sis.BackselectResult:
  """One backward selection of ``images [n, H, W, C]`` (normalised) per ``bs_config``
  (``method``: ``sis.batched_backselect``, ``gradient_backselect``, ``hybrid_backselect`` or
  ``coarse_to_fine_backselect``, which takes ``coarse``: ``(threshold, config.coarse_to_fine)``).
  ``fitted``: where memory-fitted gradient batches are kept for the next call (a pipeline
  context's ``fitted_batches``); None fits them afresh."""
  common = dict(params=variables, fully_masked=fully_masked, target_classes=target_classes,
                mesh=mesh, compute_dtype=compute_dtype)
  if bs_config.method == "exact":
    return sis.batched_backselect(apply, images, **common)
  if bs_config.method == "coarse_to_fine":
    return coarse_to_fine(apply, images, coarse, **common)
  if bs_config.method not in METHODS:
    raise ValueError(f"config.backselect.method must be one of {list(METHODS)}, got "
                     f"{bs_config.method!r}.")
  gradient = dict(common, remove_per_step=int(bs_config.remove_per_step),
                  noise_std=float(bs_config.noise_std), seed=seed,
                  batch_size=_gradient_batch(apply, variables, images, bs_config, mesh,
                                             compute_dtype, {} if fitted is None else fitted))
  if bs_config.method == "gradient":
    return sis.gradient_backselect(apply, images, **gradient)
  return sis.hybrid_backselect(apply, images, switch_fraction=float(bs_config.switch_fraction),
                               **gradient)


def coarse_to_fine(apply: Callable, images: np.ndarray, coarse, *,
                   return_level_counts: bool = False, **common):
  """``sis.coarse_to_fine_backselect`` of ``images`` with ``coarse = (threshold,
  config.coarse_to_fine)``; ``common``: ``params``, ``fully_masked``, ... as for the others."""
  if coarse is None:
    raise ValueError("coarse_to_fine selection needs its threshold and config.coarse_to_fine.")
  threshold, c = coarse
  return sis.coarse_to_fine_backselect(
      apply, images, threshold=float(threshold), patch_sizes=tuple(c.patch_sizes),
      margin=float(c.margin), min_pixels=int(c.min_pixels),
      return_level_counts=return_level_counts, **common)


def coarse_words(c) -> str:
  """How coarse-to-fine selection runs, for reports: ``"exact selection on 4×4 and 2×2
  patches placing exact selection on pixels (margin 1, at least 64 pixels)"``."""
  coarse = [f"{p}×{p}" for p in tuple(c.patch_sizes)[:-1]]
  return (f"exact selection on {' and '.join(coarse) or 'no'} patches placing exact selection "
          f"on pixels (margin {float(c.margin):g}, at least {int(c.min_pixels)} pixels)")


def _gradient_batch(apply, variables, images, bs_config, mesh, compute_dtype,
                    fitted: dict) -> int:
  """``bs_config.batch_size``, or (0) the most images per device whose pass fits the
  device's memory (``sis.gradient_batch_size``), logged once when first chosen. ``fitted``
  keeps it per (image shape, parameter shapes, precision): measuring it compiles the
  model, and it depends on nothing else."""
  if int(bs_config.batch_size):
    return int(bs_config.batch_size)
  key = (images.shape[1:], str(images.dtype), compute_dtype, len(images),
         str(jax.tree.map(np.shape, variables)))
  if key not in fitted:
    predict = precision.in_compute_dtype(apply, compute_dtype)
    fitted[key] = sis.gradient_batch_size(predict, images, params=variables, mesh=mesh)
    logging.info("Batched Gradient SIS: %d images per pass per device (fits the device's "
                 "memory budget; set backselect.batch_size to fix it).", fitted[key])
  return fitted[key]


def per_step(bs_config) -> int:
  """Features per stored step of a record (``record_shards.encode``): ``remove_per_step``
  (gradient), else 1. Hybrid records need every removal's value for their exact tail, so
  they are stored as exact ones: a rank per feature (uint16 up to 65,536 features,
  uint32 above) and one confidence per removal."""
  return int(bs_config.remove_per_step) if bs_config.method == "gradient" else 1


def step_words(bs_config) -> str:
  """How a method removes pixels, for reports: ``"128 pixels per step"`` (gradient),
  ``"128 pixels per gradient step, the last 20% of the pixels exactly"`` (hybrid), ``""``
  (exact)."""
  k = int(bs_config.remove_per_step)
  if bs_config.method == "gradient":
    return f"{k} pixels per step"
  if bs_config.method == "hybrid":
    return (f"{k} pixels per gradient step, the last {float(bs_config.switch_fraction):.0%} "
            "of the pixels exactly")
  return ""


def method_words(config) -> str:
  """``step_words`` of ``config.backselect``, or ``coarse_words`` for coarse-to-fine."""
  if config.backselect.method == "coarse_to_fine":
    return coarse_words(config.coarse_to_fine)
  return step_words(config.backselect)


def records_in_shards(shards: list[tuple[str, npz.KeyOrFingerprint, slice]],
                      compute: Callable[[slice], dict], d: int, step: int, *, desc: str,
                      progress: bool = True) -> record_shards.RecordSet:
  """Backselect records of consecutive image rows, one resumable file per shard.

  ``shards``: ``(path, key, rows)`` per file (``key`` as ``npz.load`` takes), the rows in order and
  together covering all images. A shard whose file is valid (``npz.load``
  with ``record_shards.shard_check``) is kept; the others get ``compute(rows)`` (a
  ``record_shards.encode`` dict), saved atomically at once, so a killed run loses at
  most the shard it was computing. Returns the shards as a ``RecordSet``; no records
  stay in memory.
  """
  missing = [i for i, (path, key, rows) in enumerate(shards)
             if npz.load(path, key, record_shards.shard_check(rows.stop - rows.start, d,
                                                             step)) is None]
  if missing and len(missing) < len(shards):
    logging.info("%s: %d of %d shards to compute.", desc, len(missing), len(shards))
  todo = sum(shards[i][2].stop - shards[i][2].start for i in missing)
  bar = progress_bar(total=todo, desc=desc, unit="img",
                     show=progress and bool(todo) and atomic.is_writer())
  t0, done = time.perf_counter(), 0
  for i in missing:
    path, key, rows = shards[i]
    npz.save(path, compute(rows), key)
    done += rows.stop - rows.start
    bar.update(rows.stop - rows.start)
    bar.set_postfix(img_s=f"{done / (time.perf_counter() - t0):.1f}")
  bar.close()
  return record_shards.RecordSet(shards, d, step)


def backselect_split(directory: str, apply: Callable, variables, feed: loader.Feed, bs_config,
                     key: npz.KeyOrFingerprint, *, seed: int,
                     indices: Optional[np.ndarray] = None,
                     fully_masked: Optional[Callable] = None,
                     target_classes: Optional[np.ndarray] = None, progress: bool = True,
                     desc: str = "backselect", mesh=None,
                     compute_dtype: str = "float32", coarse=None,
                     fitted: Optional[dict] = None) -> record_shards.RecordSet:
  """Backward selection of images ``indices`` (default all) of ``feed`` into
  ``directory/shard_XXXXX.npz``, ``bs_config.shard_size`` images per shard.

  ``key``: the shards' key (a ``config_reads.Key``, or a fingerprint string);
  ``fully_masked(rows of indices)``: optional masked values ``[n, H, W, C]``;
  ``target_classes``: optional ``[len(indices)]`` classes to select for (default: each
  image's predicted class); ``fitted``: as for ``run_backselect``.
  Images are read through the feed shard by shard. Every process computes (the mesh
  spans them); process 0 writes the files.
  """
  indices = np.arange(len(feed)) if indices is None else np.asarray(indices, np.int64)
  n = len(indices)
  d = int(np.prod(feed.image_shape[:2]))
  step = per_step(bs_config)
  size = int(bs_config.shard_size)
  shards = [(os.path.join(directory, f"shard_{i:05d}.npz"), key,
             slice(start, min(start + size, n))) for i, start in enumerate(range(0, n, size))]
  read = 256  # images decoded per read of the feed

  def compute(rows: slice) -> dict:
    idx = indices[rows]
    x = np.concatenate([feed.batch(idx[i:i + read])[0] for i in range(0, len(idx), read)])
    fm = None if fully_masked is None else fully_masked(rows)
    r = run_backselect(apply, variables, x, bs_config, seed=seed + rows.start,
                       fully_masked=fm, mesh=mesh, compute_dtype=compute_dtype, coarse=coarse,
                       fitted=fitted, target_classes=None if target_classes is None else
                       np.asarray(target_classes)[rows])
    return record_shards.encode(r.order, r.values, r.target_classes, r.original_scores,
                                [feed.source.example_id(int(i)) for i in idx], step)

  return records_in_shards(shards, compute, d, step, desc=desc, progress=progress)


def records(ctx, split: str, indices: Optional[tuple] = None,
            masking: str = "mean") -> record_shards.RecordSet:
  """Backward selection of images ``indices`` (a tuple; default all) of ``split`` with the
  context's base model, masked value ``masking`` (``masked_data.MASKING_VALUES``): the
  records in shards under ``backselect/``, computed where missing. The whole split with the
  mean is this stage's result; other selections are the calling stage's (the controls')."""
  directory = ctx.path("backselect", split if masking == "mean" else f"{split}_{masking}")
  whole = masking == "mean" and indices is None
  owner = "backselect" if whole else ctx.stage
  chosen = None if indices is None else np.asarray(indices, np.int64)
  fm = None
  if masking != "mean":
    where = np.arange(ctx.data.num_examples(split)) if chosen is None else chosen
    fm = lambda rows: ctx.fully_masked(split, masking, where[rows])
  # Each shard is keyed by the reads made for it.
  with ctx.owned_by(owner), config_reads.recording() as reads:
    key = config_reads.Key(hashing.fingerprint(
        ctx.base_fp, split, masking, sis.SELECTION_VERSION,
        *([] if indices is None else [list(indices)])), ctx.config, reads)
    result = backselect_split(
        directory, ctx.base.apply, ctx.base.variables, ctx.feed(split),
        ctx.config.backselect, key,
        seed=int(ctx.config.backselect.noise_seed) + (0 if split == "train" else 10**7),
        indices=chosen, fully_masked=fm, progress=ctx.progress,
        desc=f"backselect {split} ({masking})", mesh=ctx.mesh,
        compute_dtype=ctx.config.model.precision, coarse=coarse_args(ctx.config),
        fitted=ctx.fitted_batches)
  # Shards read later (by this or another stage) count as the owner's reads.
  result.guard = lambda: ctx.owned_by(owner)
  return result


def coarse_args(config):
  """``(sis.threshold, config.coarse_to_fine)`` when ``backselect.method`` is coarse-to-fine,
  else None (and neither is read, so other methods' results do not depend on them)."""
  if config.backselect.method != "coarse_to_fine":
    return None
  return float(config.sis.threshold), config.coarse_to_fine


def run(ctx) -> dict:
  out = {"method": ctx.config.backselect.method}
  for split in SPLITS:
    r = ctx.backselect(split)
    n = len(r)
    out[split] = {"count": n, "num_features": r.num_features,
                  "mean_original_score": float(r.original_scores.mean()) if n else None}
  return out


def report_section(ctx, s: dict) -> list[str]:
  """One line: how the pixels were ranked."""
  if "backselect" not in s:
    return []
  b = s["backselect"]
  return [f"Pixel ranking: {b['method']} backward selection of {b['train']['count']} train and "
          f"{b['test']['count']} test images"
          + (f", {method_words(ctx.config)}." if b["method"] != "exact" else "."), ""]


STAGE = registry.Unit("backselect", "backselect", run, report_section)
