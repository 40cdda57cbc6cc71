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

import numpy as np
from absl import logging
from tqdm import tqdm

from overinterp_jax import sis
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
                   seed: int, fully_masked=None, target_classes=None, mesh=None
                   ) -> sis.BackselectResult:
  """One backward selection of ``images [n, H, W, C]`` (normalised) per ``bs_config``."""
  if bs_config.method == "exact":
    return sis.batched_backselect(apply, images, params=variables, fully_masked=fully_masked,
                                  target_classes=target_classes, mesh=mesh)
  if bs_config.method == "gradient":
    return sis.gradient_backselect(apply, images, params=variables, fully_masked=fully_masked,
                                   target_classes=target_classes,
                                   remove_per_step=int(bs_config.remove_per_step),
                                   noise_std=float(bs_config.noise_std), seed=seed,
                                   batch_size=int(bs_config.batch_size), mesh=mesh)
  raise ValueError(f"config.backselect.method must be 'exact' or 'gradient', got "
                   f"{bs_config.method!r}.")


def backselect_split(directory: str, apply: Callable, variables, images: np.ndarray,
                     prepare: Callable, bs_config, fp: str, *, seed: int, fully_masked=None,
                     progress: bool = True, desc: str = "backselect", mesh=None) -> dict:
  """Backward selection of every image of one split into ``directory/shard_XXXXX.npz``.

  ``fully_masked``: optional ``[N, H, W, C]`` masked values per image.
  Returns ``{"order", "values", "targets", "original_scores"}`` of all images.
  Every process computes (the mesh spans them); process 0 writes the files.
  """
  n = len(images)
  size = int(bs_config.shard_size)
  d = int(np.prod(images.shape[1:3]))
  starts = list(range(0, n, size))
  results = [None] * len(starts)
  missing = []
  for i, start in enumerate(starts):
    path = os.path.join(directory, f"shard_{i:05d}.npz")
    count = min(size, n - start)
    results[i] = artifacts.load(path, fp, shard_check(count, d))
    if results[i] is None:
      missing.append(i)
  if missing:
    logging.info("%s: %d of %d shards to compute.", desc, len(missing), len(starts))
  todo = sum(min(size, n - starts[i]) for i in missing)
  bar = tqdm(total=todo, desc=desc, unit="img", disable=not progress or not todo)
  t0, done = time.perf_counter(), 0
  for i in missing:
    start = starts[i]
    stop = min(start + size, n)
    fm = None if fully_masked is None else fully_masked[start:stop]
    r = run_backselect(apply, variables, prepare(images[start:stop]), bs_config,
                       seed=seed + start, fully_masked=fm, mesh=mesh)
    arrays = to_record(r)
    artifacts.save(os.path.join(directory, f"shard_{i:05d}.npz"), arrays, fp)
    results[i] = arrays
    done += stop - start
    bar.update(stop - start)
    bar.set_postfix(img_s=f"{done / (time.perf_counter() - t0):.1f}")
  bar.close()
  return {k: np.concatenate([r[k] for r in results]) for k in results[0]}
