"""Coarse-to-fine backward selection: exact selection on patches decides, per image, where
exact selection on pixels begins (``coarse_to_fine_backselect``).

Level 0 runs exact backward selection on the whole image with ``p0 × p0`` patches as
features (64 features for 4 × 4 patches of a 32 × 32 image: 2,080 evaluations). Its SIS
at ``threshold`` says how much of the image this image needs; the next, finer level runs
exact selection only on the patches of that SIS (times ``margin``, at least
``min_pixels``), and so on down to single pixels. Every level starts from a state of the
previous level's own trajectory whose recorded score reaches the threshold, so the last
level's selection starts at or above it and the SIS read from the whole record reaches
it by construction. ``patch_sizes=(1,)`` is exact backward selection
(``batched_backselect``), bitwise.

Why patches and not the gradient (``hybrid_backselect``) decide where exact selection
starts: measured on the shipped ResNet-20 (docs/results/adaptive_selection.md), the
gradient's own trajectory drops below τ = 0.99 with 72-576 pixels left where exact
selection's SIS is 19-41 pixels, so an exact phase started from it begins below τ on
most images unless it covers hundreds of pixels; exact selection on 4 × 4 patches keeps
τ down to 112-192 pixels.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from overinterp_jax import precision, sharding
from overinterp_jax.selection import features, records
from overinterp_jax.sis.batched import (BackselectResult, check_num_classes, exact_phase,
                                        prepare_images)
from overinterp_jax.sis.checks import check_threshold


# A level's step count is rounded up to a multiple of this (``_num_steps``).
STEP_MULTIPLE = 64


class Level(NamedTuple):
  """One level's features: ``patch`` side in pixels, ``fmap [H, W]`` feature ids (None
  for pixels), ``members [d_l, patch²]`` each feature's pixel ids ascending."""
  patch: int
  fmap: np.ndarray | None
  members: np.ndarray


def valid_patch_sequence(patch_sizes: Sequence) -> bool:
  """Whether ``patch_sizes`` are positive integers, strictly decreasing, each dividing the
  one before, the last 1 (pixels): the levels' rule, whatever the image size."""
  sizes = tuple(patch_sizes)
  return (len(sizes) > 0
          and all(isinstance(p, (int, np.integer)) and not isinstance(p, bool) and p >= 1
                  for p in sizes)
          and sizes[-1] == 1 and all(a > b and a % b == 0 for a, b in zip(sizes, sizes[1:])))


def check_patch_sizes(patch_sizes: Sequence[int], height_width) -> tuple[int, ...]:
  """``patch_sizes`` as a tuple, or ``ValueError``: ``valid_patch_sequence``, and the first
  (largest) dividing both image sides."""
  sizes = tuple(patch_sizes)
  h, w = height_width
  if not (valid_patch_sequence(sizes) and h % sizes[0] == 0 and w % sizes[0] == 0):
    raise ValueError(
        f"patch_sizes must be positive integers, strictly decreasing, each dividing the one "
        f"before and the image sides {h}x{w}, ending with 1 (pixels); got {patch_sizes!r}.")
  return tuple(int(p) for p in sizes)


def _level(patch: int, h: int, w: int) -> Level:
  fmap = features.patch_feature_map(h, w, patch)
  members = np.argsort(fmap.reshape(-1), kind="stable").reshape(-1, patch * patch)
  return Level(patch, None if patch == 1 else fmap, members)


def _state_values(order, values, counts, start_values) -> np.ndarray:
  """``[n, m + 1]``: the score of the state with ``k`` of an image's ``counts`` features
  present, at column ``k`` (NaN beyond ``counts``): ``start_values`` at ``k = counts``,
  ``values[counts - k - 1]`` below."""
  n, m = order.shape
  out = np.full((n, m + 1), np.nan, values.dtype)
  for i in range(n):
    c = int(counts[i])
    out[i, c] = start_values[i]
    out[i, :c] = values[i, :c][::-1]
  return out


def choose_kept(state_values: np.ndarray, counts: np.ndarray, tau: float, margin: float,
                min_features: int) -> tuple[np.ndarray, np.ndarray]:
  """``(kept [n], sis [n])``: how many of each image's last-removed features the next level
  starts from, and this level's SIS size (in features; ``counts`` where no state reaches).

  The target is ``max(ceil(margin · sis), min_features)`` (``min_features`` where no state
  reaches ``tau``), at most ``counts``; ``kept`` is the smallest size at or above the target
  whose state reaches ``tau``, else the largest below it that does, else the target.
  """
  n = len(counts)
  kept, sis_size = np.zeros(n, np.int64), np.zeros(n, np.int64)
  for i in range(n):
    c = int(counts[i])
    reached = np.flatnonzero(records.reaches(state_values[i, :c + 1], tau))
    sis_size[i] = reached.min() if len(reached) else c
    # Without a state at tau there is no SIS to place: the next level starts from the minimum.
    wanted = int(math.ceil(round(margin * sis_size[i], 9))) if len(reached) else 0
    target = min(c, max(wanted, min_features))
    above, below = reached[reached >= target], reached[reached < target]
    kept[i] = above.min() if len(above) else (below.max() if len(below) else target)
  return kept, sis_size


def _num_steps(counts: np.ndarray, num_features: int) -> int:
  """Steps of one level's compiled program: the most features an image starts with, rounded
  up to a multiple of ``STEP_MULTIPLE`` (at most ``num_features``), so that calls with
  nearby counts share one compiled program. Images with fewer features stop recording."""
  most = int(counts.max())
  return min(num_features, -(-most // STEP_MULTIPLE) * STEP_MULTIPLE) if most else 1


def _expand(level: Level, order_rows, value_rows):
  """Pixel ids and their recorded scores of removed features, each feature's pixels
  ascending, all with the score after the feature's removal."""
  pix = level.members[np.asarray(order_rows, np.int64)].reshape(-1)
  return pix, np.repeat(np.asarray(value_rows), level.members.shape[1])


def coarse_to_fine_backselect(predict_fn: Callable, images, *, threshold: float,
                              patch_sizes: Sequence[int] = (4, 2, 1), margin: float = 1.0,
                              min_pixels: int = 64, params: Any = None,
                              target_classes=None, fully_masked=None,
                              apply_softmax: bool = True, eval_batch_size: int | None = None,
                              images_per_group: int | None = None,
                              memory_budget_bytes: int | None = None,
                              compute_dtype: str | None = None, mesh=None,
                              return_level_counts: bool = False):
  """Exact backward selection of N images, coarse to fine (module docstring).

  Level ``l`` (features: ``patch_sizes[l]``-sided patches) runs exact backward selection
  (as ``batched_backselect``: every present feature scored, the best removal kept, ties to
  the lowest id) on the features each image kept from level ``l - 1`` (level 0: all). Its
  SIS at ``threshold`` (``s`` features) sets the next level's start: the last-removed
  ``max(ceil(margin · s), ceil(min_pixels / p_l²))`` features, moved to the nearest size
  whose recorded state reaches ``threshold`` (``choose_kept``). The record lists, per
  image, each level's removed features as their pixels (ascending within a patch, each with
  the score after that patch's removal, as ``gradient_backselect`` records a step) and then
  the last level's exact order.

  Cost per image: ``sum_l c_l (c_l + 1) / 2`` model evaluations for the ``c_l`` features a
  level starts with (``return_level_counts``); measured on the shipped ResNet-20 at
  ``(4, 2, 1)``, margin 1: ~5,200 against exact's 524,800 (docs/results/adaptive_selection.md).

  Args:
    predict_fn, images, params, target_classes, fully_masked, apply_softmax,
      eval_batch_size, images_per_group, memory_budget_bytes, compute_dtype, mesh: as in
      ``batched_backselect`` (pixels are the features; no ``feature_map``).
    threshold: τ of the SISes that place the levels (probability: in [0, 1] with
      ``apply_softmax``).
    patch_sizes: strictly decreasing patch sides, each dividing the one before and the
      image sides, ending with 1. ``(1,)``: exact selection, bitwise.
    margin: >= 1, the next level's start as a multiple of this level's SIS.
    min_pixels: >= 0, the least number of pixels the next level starts with (e.g. 64:
      a 5% pixel-subset of 1,024 pixels, 52, is chosen by the last level).
    return_level_counts: also return ``[N, L]`` features each level started with.

  Returns:
    ``BackselectResult`` over pixels (``order [N, H·W]``, ``values [N, H·W]``), and with
    ``return_level_counts`` the counts: ``(result, counts)``.
  """
  tau = _check_args(threshold, apply_softmax, margin, min_pixels)
  n, h, w = _image_dims(images)
  sizes = check_patch_sizes(patch_sizes, (h, w))
  predict_fn = precision.in_compute_dtype(predict_fn, compute_dtype, params is not None)
  exact_args = dict(apply_softmax=apply_softmax, eval_batch_size=eval_batch_size,
                    images_per_group=images_per_group, memory_budget_bytes=memory_budget_bytes,
                    mesh=mesh if mesh is not None else sharding.data_mesh())
  record = _Record(n, h * w)
  targets, region, first = target_classes, None, None
  for l, p in enumerate(sizes):
    level = _level(p, h, w)
    prepared = prepare_images(images, fully_masked, level.fmap, targets)
    if l == 0:
      check_num_classes(predict_fn, params, prepared.images, prepared.targets, apply_softmax)
      present0, counts = None, np.full((n,), prepared.d, np.int64)
    else:
      present0 = region[:, level.members[:, 0]]
      counts = present0.sum(axis=1)
    res = exact_phase(predict_fn, params, prepared, present0, _num_steps(counts, prepared.d),
                      **exact_args)
    if first is None:
      first, targets = res, res.target_classes
      record.start_values = res.original_scores
    kept = np.zeros((n,), np.int64)
    if l < len(sizes) - 1:
      states = _state_values(res.order, res.values, counts, record.start_values)
      kept, _ = choose_kept(states, counts, tau, float(margin),
                            int(math.ceil(min_pixels / (p * p))))
    region = record.add_level(level, res, counts, kept)
  result = BackselectResult(first.target_classes, first.original_scores, *record.arrays())
  if return_level_counts:
    return result, np.stack(record.counts, axis=1)
  return result


def _check_args(threshold, apply_softmax, margin, min_pixels) -> float:
  tau = check_threshold(threshold, probability=bool(apply_softmax))
  if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 1):
    raise ValueError(f"margin must be a number >= 1, got {margin!r}.")
  if isinstance(min_pixels, bool) or not isinstance(min_pixels, (int, np.integer)) \
      or min_pixels < 0:
    raise ValueError(f"min_pixels must be an integer >= 0, got {min_pixels!r}.")
  return tau


def _image_dims(images) -> tuple[int, int, int]:
  shape = np.shape(images)
  if len(shape) != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {shape}.")
  return shape[0], shape[1], shape[2]


class _Record:
  """The pixel record being built: each level's removed features as pixels, then the last
  level's order; ``start_values [n]`` the score of the state the next level starts from."""

  def __init__(self, n: int, d: int):
    self.n, self.d = n, d
    self.order = [[] for _ in range(n)]
    self.values = [[] for _ in range(n)]
    self.counts: list[np.ndarray] = []
    self.start_values = None

  def add_level(self, level: Level, res: BackselectResult, counts, kept) -> np.ndarray:
    """Records a level's first ``counts - kept`` removals of each image; returns the
    ``[n, d]`` pixels the next level starts from (the last ``kept`` removed features)."""
    self.counts.append(counts)
    region = np.zeros((self.n, self.d), bool)
    next_start = np.empty((self.n,), res.values.dtype)
    for i in range(self.n):
      c, k = int(counts[i]), int(kept[i])
      pix, vals = _expand(level, res.order[i, :c - k], res.values[i, :c - k])
      self.order[i].append(pix)
      self.values[i].append(vals)
      region[i, level.members[res.order[i, c - k:c]].reshape(-1)] = True
      next_start[i] = res.values[i, c - k - 1] if c > k else self.start_values[i]
    self.start_values = next_start
    return region

  def arrays(self) -> tuple[np.ndarray, np.ndarray]:
    """``(order [n, d] int32, values [n, d])``."""
    order = np.stack([np.concatenate(o) for o in self.order]).astype(np.int32)
    values = np.stack([np.concatenate(v) for v in self.values])
    if order.shape != (self.n, self.d):
      raise AssertionError(f"coarse_to_fine: order of shape {order.shape}, expected "
                           f"{(self.n, self.d)}.")
    return order, values
