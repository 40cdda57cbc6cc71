"""Backselect records in compact shards on disk, read back as a stream.

One shard file (``npz.save``: fingerprint + checksum, atomic) holds the
records of consecutive images of a split:

  * ``rank [n, d]``: per feature, its removal position (0 = removed first), in
    the smallest unsigned integer type that holds ``d - 1`` — uint16 for any
    image up to 256×256 (CIFAR: 2 bytes per pixel instead of 8). Above 65,536
    features, the removal *step* is kept instead (``rank // per_step``: uint16 for
    Batched Gradient SIS with ≥ 2 pixels per step, e.g. 895 steps of 100 at
    299×299), and features removed in one step tie. Records of one removal per
    step (``per_step = 1``: exact and hybrid selection) keep exact ranks at any
    size, uint32 above 65,536 features.
  * ``step_values [n, S]``: the target confidence after each step (``S = ceil(d /
    per_step)``; one value per step, as Batched Gradient SIS computes them),
    float16 when the record is large (``d > 4,096``), else float32.
  * ``targets [n]``, ``original_scores [n]`` and ``ids [n]`` (stable example keys:
    the image path or TFDS file name).

``RecordSet`` reads a split's shards: the small per-image arrays (``targets``,
``original_scores``, ``ids``) whole, the ``[n, d]`` records only shard by shard
(``shards()``) or for chosen rows (``rows(indices)``); nothing holds a whole
split's records.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Optional, Sequence

import numpy as np

from overinterp_jax.store import hashing, npz


LARGE_RECORD = 4096  # features above which confidences are stored as float16
MAX_RANKS = 65536    # features above which steps replace ranks


def rank_dtype(max_value: int) -> np.dtype:
  """The smallest unsigned integer type holding ``max_value``."""
  for dtype in (np.uint8, np.uint16, np.uint32):
    if max_value <= np.iinfo(dtype).max:
      return np.dtype(dtype)
  return np.dtype(np.uint64)


def rank_unit(d: int, per_step: int) -> int:
  """Features per stored rank unit: 1 (exact ranks) unless ``d > MAX_RANKS``."""
  return per_step if d > MAX_RANKS else 1


def encode(order: np.ndarray, values: np.ndarray, targets: np.ndarray,
           original_scores: np.ndarray, ids: Sequence[str], per_step: int,
           fine_start: Optional[np.ndarray] = None) -> dict:
  """The compact record of ``order [n, d]`` (feature ids, first removed first) and
  ``values [n, d]`` (confidence after each removal; constant within each step of
  ``per_step`` removals); ``fine_start [n]``: for coarse-to-fine records, the pixels the
  exact selection on pixels started from (kept as is)."""
  n, d = order.shape
  unit = rank_unit(d, per_step)
  rank = np.empty((n, d), np.int64)
  np.put_along_axis(rank, order.astype(np.int64), np.arange(d)[None, :], axis=1)
  rank //= unit
  num_steps = -(-d // per_step)
  step_values = values[:, np.minimum(np.arange(num_steps) * per_step + per_step - 1, d - 1)]
  out = {"rank": rank.astype(rank_dtype((d - 1) // unit)),
         "step_values": step_values.astype(np.float16 if d > LARGE_RECORD else np.float32),
         "targets": np.asarray(targets, np.int32),
         "original_scores": np.asarray(original_scores, np.float32),
         "ids": np.asarray(list(ids), dtype=str)}
  if fine_start is not None:
    out["fine_start"] = np.asarray(fine_start, np.int32)
  return out


def decode(shard: dict, per_step: int) -> dict:
  """``{"order", "values", "targets", "original_scores", "ids"}`` of a shard: ``order
  [n, d]`` int32 (ties of a stored step: lower feature id first), ``values [n, d]``
  float32."""
  rank = shard["rank"].astype(np.int64)
  n, d = rank.shape
  order = np.argsort(rank, axis=1, kind="stable").astype(np.int32)
  values = np.repeat(shard["step_values"].astype(np.float32), per_step, axis=1)[:, :d]
  out = {"order": order, "values": values, "targets": shard["targets"],
         "original_scores": shard["original_scores"], "ids": shard["ids"]}
  if "fine_start" in shard:
    out["fine_start"] = shard["fine_start"]
  return out


def shard_check(n: int, d: int, per_step: int):
  """``npz.load`` check of one shard of ``n`` records of ``d`` features."""
  num_steps = -(-d // per_step)
  unit = rank_unit(d, per_step)

  def check(a: dict) -> Optional[str]:
    for key, shape in (("rank", (n, d)), ("step_values", (n, num_steps)), ("targets", (n,)),
                       ("original_scores", (n,)), ("ids", (n,))):
      if key not in a or a[key].shape != shape:
        return f"{key} missing or not of shape {shape}"
    if unit == 1 and not np.array_equal(np.sort(a["rank"], axis=1),
                                        np.broadcast_to(np.arange(d), (n, d))):
      return "a rank row is not a permutation"
    if unit > 1 and n and (a["rank"].max() > (d - 1) // unit):
      return "a step is out of range"
    if not np.all(np.isfinite(a["step_values"])):
      return "non-finite values"
    return None
  return check


class RecordSet:
  """The backselect records of one split, in shards ``[(path, key, rows)]`` (``key``: a
  ``config_reads.Key`` or a fingerprint string, as ``npz.load`` takes).

  Attributes:
    num_features: ``d``.
    per_step: features removed per step (1 = exact backward selection).
  """

  def __init__(self, shards: Sequence[tuple[str, npz.KeyOrFingerprint, slice]],
               num_features: int,
               per_step: int):
    self._shards = list(shards)
    self.num_features, self.per_step = int(num_features), int(per_step)
    self._small: Optional[dict] = None
    # Context for reading a shard (the pipeline attributes the reads a shard's key replays
    # to the stage that made the records: ``Context.owned_by``).
    self.guard = contextlib.nullcontext

  def __len__(self) -> int:
    return self._shards[-1][2].stop if self._shards else 0

  def _load(self, i: int) -> dict:
    path, key, rows = self._shards[i]
    with self.guard():
      shard = npz.load(path, key, shard_check(rows.stop - rows.start, self.num_features,
                                             self.per_step))
    if shard is None:
      raise FileNotFoundError(f"Backselect shard {path} is missing or invalid; run the "
                              "backselect stage again.")
    return shard

  def checksum(self) -> str:
    """sha256 over every shard's arrays (read one shard at a time)."""
    h = hashlib.sha256()
    for i in range(len(self._shards)):
      h.update(hashing.checksum(self._load(i)).encode())
    return h.hexdigest()

  def shards(self) -> Iterator[tuple[slice, dict]]:
    """``(rows, decoded records)`` of each shard in order (``decode``)."""
    for i, (_, _, rows) in enumerate(self._shards):
      yield rows, decode(self._load(i), self.per_step)

  def small(self) -> dict:
    """``targets``, ``original_scores`` and ``max_values`` (highest confidence over the
    selection) of every image: ``[N]`` numbers (ids only through ``rows``)."""
    if self._small is None:
      parts = []
      for i in range(len(self._shards)):
        s = self._load(i)
        parts.append({"targets": s["targets"], "original_scores": s["original_scores"],
                      "max_values": s["step_values"].astype(np.float32).max(axis=1)})
      self._small = ({k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else
                     {"targets": np.zeros(0, np.int32), "original_scores":
                      np.zeros(0, np.float32), "max_values": np.zeros(0, np.float32)})
    return self._small

  @property
  def targets(self) -> np.ndarray:
    return self.small()["targets"]

  @property
  def original_scores(self) -> np.ndarray:
    return self.small()["original_scores"]

  def rows(self, indices) -> dict:
    """The decoded records of images ``indices`` (in that order), reading only their shards."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    out = {}
    starts = np.array([rows.start for _, _, rows in self._shards])
    which = np.searchsorted(starts, indices, side="right") - 1
    parts = {}
    for i in np.unique(which):
      rows = self._shards[i][2]
      dec = decode(self._load(int(i)), self.per_step)
      mine = which == i
      parts[int(i)] = (np.flatnonzero(mine), {k: v[indices[mine] - rows.start]
                                              for k, v in dec.items()})
    if not parts:
      d = self.num_features
      return {"order": np.zeros((0, d), np.int32), "values": np.zeros((0, d), np.float32),
              "targets": np.zeros(0, np.int32), "original_scores": np.zeros(0, np.float32),
              "ids": np.zeros(0, str)}
    for key in next(iter(parts.values()))[1]:
      first = next(iter(parts.values()))[1][key]
      arr = np.empty((len(indices),) + first.shape[1:], first.dtype)
      for where, dec in parts.values():
        arr[where] = dec[key]
      out[key] = arr
    return out

  def everything(self) -> dict:
    """All records decoded (small data only: tests, figures of small splits)."""
    return self.rows(np.arange(len(self)))
