"""What follows from a backward-selection record: SISes at any threshold, keep masks.

A record of one input is ``order [m]`` (feature ids, first removed first) and
``values [m]`` (the score after each removal). The score recorded at step t
is the score with only the features removed *after* step t present.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def threshold_in(threshold: float, dtype) -> np.generic:
  """``threshold`` as a scalar of the scores' ``dtype`` (float64 for non-float scores).

  Every ``score >= threshold`` of a selection is decided in this one dtype: float32
  scores against float32(τ), float64 scores (JAX's x64 mode) against float64(τ), as
  numpy compares a float32 array with a Python float. Comparing a float64 score with
  float32(0.1) instead (which rounds up) would call 0.1 below 0.1.
  """
  dtype = np.dtype(dtype)
  return dtype.type(threshold) if jnp.issubdtype(dtype, jnp.floating) else np.float64(threshold)


def reaches(scores, threshold: float) -> np.ndarray:
  """``scores >= threshold``, compared in the scores' dtype (``threshold_in``)."""
  scores = np.asarray(scores)
  return scores >= threshold_in(threshold, scores.dtype)


def sis_length(values: np.ndarray, threshold: float) -> np.ndarray:
  """Number of trailing removals that form the SIS (FindSIS), per record.

  FindSIS walks back from the last removal and stops at the first step whose
  recorded score is ``>= threshold``; the removals after it are the SIS. With
  no such step the SIS is every removal; with the last value itself
  ``>= threshold`` (the fully masked input suffices) the SIS is empty.

  Args:
    values: ``[..., m]`` scores over backward selection.
    threshold: the SIS threshold (compared in the values' dtype, ``threshold_in``).

  Returns:
    ``[...]`` int64 SIS sizes (``0 .. m``).
  """
  values = np.asarray(values)
  m = values.shape[-1]
  reached = reaches(values, threshold)
  # Last step (from the start) whose value reaches the threshold; -1 if none.
  last = np.where(reached.any(axis=-1), m - 1 - np.argmax(reached[..., ::-1], axis=-1), -1)
  return (m - 1 - last).astype(np.int64)


def pixels_to_keep(num_features: int, frac_kept: float) -> int:
  """``ceil(frac_kept · d)`` features; e.g. 52 of 1,024 at ``frac_kept=0.05``."""
  if not (isinstance(frac_kept, (int, float)) and 0 < frac_kept <= 1):
    raise ValueError(f"frac_kept must be in (0, 1], got {frac_kept!r}.")
  # Round away float noise before the ceiling (0.05 · 1024 = 51.2000000001).
  return max(1, math.ceil(round(frac_kept * num_features, 9)))


def whole_steps_to_keep(num_features: int, num_kept: int, per_step: int) -> int:
  """The fewest features of whole removal steps, counted from the last step back, that
  hold at least ``num_kept``: records that store only each feature's removal step (not
  its rank within the step) cannot split a step without an arbitrary choice. The last
  step removes ``d - (ceil(d / k) - 1)·k`` features; e.g. 9,001 of 89,401 pixels at
  ``k = 100`` for 8,941 wanted (the public code's count). ``per_step = 1``: ``num_kept``."""
  if per_step <= 1:
    return num_kept
  last = num_features - (math.ceil(num_features / per_step) - 1) * per_step
  if num_kept <= last:
    return last
  return min(num_features, last + per_step * math.ceil((num_kept - last) / per_step))


def keep_last_removed(order: np.ndarray, num_kept: np.ndarray | int,
                      num_features: int) -> np.ndarray:
  """Boolean feature masks keeping the last ``num_kept`` removed features.

  Args:
    order: ``[N, d]`` feature ids in removal order (first removed first).
    num_kept: int or ``[N]`` ints, how many of the last removals to keep.
    num_features: ``d``.

  Returns:
    ``[N, d]`` bool, True on kept features.
  """
  order = np.asarray(order)
  if order.ndim != 2 or order.shape[1] != num_features:
    raise ValueError(f"order must have shape [N, {num_features}], got {order.shape}.")
  n = order.shape[0]
  num_kept = np.broadcast_to(np.asarray(num_kept), (n,))
  position = np.arange(num_features)[None, :]
  kept_positions = position >= (num_features - num_kept[:, None])
  mask = np.zeros((n, num_features), bool)
  np.put_along_axis(mask, order, kept_positions, axis=1)
  return mask
