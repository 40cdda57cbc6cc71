"""Stage ``backselect``: backward selection of every train and test image, in shards.

Shard ``i`` of a split holds images ``[i·S, (i+1)·S)`` (``S = shard_size``):
``order [n, d]`` (feature ids, first removed first), ``values [n, d]`` (target
confidence after each removal), ``targets [n]`` and ``original_scores [n]``.
Shards are written atomically and validated on read (fingerprint, checksum,
shapes, every order a permutation), so a re-run resumes at the first shard
that is missing or invalid. Method ``"exact"`` is ``sis.batched_backselect``;
``"gradient"`` is ``sis.gradient_backselect`` (Batched Gradient SIS).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from overinterp_jax import precision, sis
from overinterp_jax.pipeline import artifacts

SPLITS = ("train", "test")


def shard_check(n: int, d: int) -> Callable[[dict], Optional[str]]:
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


def to_record(r: sis.BackselectResult) -> dict:
  """The arrays stored per image set: ``order``, ``values``, ``targets``, ``original_scores``."""
  return {"order": r.order.astype(np.int32), "values": r.values.astype(np.float32),
          "targets": r.target_classes.astype(np.int32),
          "original_scores": r.original_scores.astype(np.float32)}


def run_backselect(apply: Callable, variables, images: np.ndarray, bs_config, *,
                   seed: int, fully_masked=None, target_classes=None, mesh=None,
                   compute_dtype: str = "float32") -> sis.BackselectResult:
  """One backward selection of ``images [n, H, W, C]`` (normalised) per ``bs_config``."""
  if bs_config.method == "exact":
    return sis.batched_backselect(apply, images, params=variables, fully_masked=fully_masked,
                                  target_classes=target_classes, mesh=mesh,
                                  compute_dtype=compute_dtype)
  if bs_config.method == "gradient":
    return sis.gradient_backselect(apply, images, params=variables, fully_masked=fully_masked,
                                   target_classes=target_classes,
                                   remove_per_step=int(bs_config.remove_per_step),
                                   noise_std=float(bs_config.noise_std), seed=seed,
                                   batch_size=_gradient_batch(apply, variables, images,
                                                              bs_config, mesh, compute_dtype),
                                   mesh=mesh,
                                   compute_dtype=compute_dtype)
  raise ValueError(f"config.backselect.method must be 'exact' or 'gradient', got "
                   f"{bs_config.method!r}.")


# Memory-fitted batch per (image shape, parameter shapes, precision): measuring it
# compiles the model, and it depends on nothing else.
_FITTED: dict = {}


def _gradient_batch(apply, variables, images, bs_config, mesh, compute_dtype) -> int:
  """``bs_config.batch_size``, or (0) the most images per device whose pass fits the
  device's memory (``sis.gradient_batch_size``), logged once when first chosen."""
  if int(bs_config.batch_size):
    return int(bs_config.batch_size)
  key = (images.shape[1:], str(images.dtype), compute_dtype, len(images),
         str(jax.tree.map(np.shape, variables)))
  if key not in _FITTED:
    predict = precision.in_compute_dtype(apply, compute_dtype)
    _FITTED[key] = sis.gradient_batch_size(predict, images, params=variables, mesh=mesh)
    logging.info("Batched Gradient SIS: %d images per pass per device (fits the device's "
                 "memory budget; set backselect.batch_size to fix it).", _FITTED[key])
  return _FITTED[key]


def records_in_shards(shards: list[tuple[str, str, slice]], compute: Callable[[slice], dict],
                      d: int, *, desc: str, progress: bool = True) -> dict:
  """Backselect records of consecutive image rows, one resumable file per shard.

  ``shards``: ``(path, fingerprint, rows)`` per file, the rows in order and
  together covering all images. A shard whose file is valid (``artifacts.load``
  with ``shard_check``) is read back; the others get ``compute(rows)`` (a
  ``to_record`` dict), saved atomically at once, so a killed run loses at most
  the shard it was computing. Returns the records of all rows concatenated.
  """
  results = [artifacts.load(path, fp, shard_check(rows.stop - rows.start, d))
             for path, fp, rows in shards]
  missing = [i for i, r in enumerate(results) if r is None]
  if missing and len(missing) < len(shards):
    logging.info("%s: %d of %d shards to compute.", desc, len(missing), len(shards))
  todo = sum(shards[i][2].stop - shards[i][2].start for i in missing)
  bar = tqdm(total=todo, desc=desc, unit="img",
             disable=not progress or not todo or not artifacts.is_writer())
  t0, done = time.perf_counter(), 0
  for i in missing:
    path, fp, rows = shards[i]
    results[i] = compute(rows)
    artifacts.save(path, results[i], fp)
    done += rows.stop - rows.start
    bar.update(rows.stop - rows.start)
    bar.set_postfix(img_s=f"{done / (time.perf_counter() - t0):.1f}")
  bar.close()
  return {k: np.concatenate([r[k] for r in results]) for k in results[0]}


def backselect_split(directory: str, apply: Callable, variables, images: np.ndarray,
                     prepare: Callable, bs_config, fp: str, *, seed: int, fully_masked=None,
                     progress: bool = True, desc: str = "backselect", mesh=None,
                     compute_dtype: str = "float32") -> dict:
  """Backward selection of every image of one split into ``directory/shard_XXXXX.npz``.

  ``fully_masked``: optional ``[N, H, W, C]`` masked values per image.
  Returns ``{"order", "values", "targets", "original_scores"}`` of all images.
  Every process computes (the mesh spans them); process 0 writes the files.
  """
  n = len(images)
  d = int(np.prod(images.shape[1:3]))
  if n == 0:  # a split the data does not have (the shipped slice has no train images)
    return {"order": np.zeros((0, d), np.int32), "values": np.zeros((0, d), np.float32),
            "targets": np.zeros((0,), np.int32), "original_scores": np.zeros((0,), np.float32)}
  size = int(bs_config.shard_size)
  shards = [(os.path.join(directory, f"shard_{i:05d}.npz"), fp,
             slice(start, min(start + size, n))) for i, start in enumerate(range(0, n, size))]

  def compute(rows: slice) -> dict:
    fm = None if fully_masked is None else fully_masked[rows]
    return to_record(run_backselect(apply, variables, prepare(images[rows]), bs_config,
                                    seed=seed + rows.start, fully_masked=fm, mesh=mesh,
                                    compute_dtype=compute_dtype))

  return records_in_shards(shards, compute, d, desc=desc, progress=progress)
