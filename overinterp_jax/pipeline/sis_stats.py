"""Medians of SIS sizes with bootstrap intervals, and paired differences between models.

Pure functions of arrays of sizes (pixels), one entry per image; the same images
in the same order for every model when differences are taken. Intervals are
percentile bootstrap intervals over images: resample the images with replacement
``num`` times (seeded), recompute the statistic, take the ``(1 - level) / 2`` and
``(1 + level) / 2`` quantiles.
"""
from __future__ import annotations

import numpy as np


def _resampled(n: int, num: int, seed: int) -> np.ndarray:
  """``[num, n]`` image indices drawn with replacement (one row per bootstrap sample)."""
  return np.random.default_rng(seed).integers(0, n, size=(num, n))


def _percentile_interval(boot: np.ndarray, level: float) -> tuple[float, float]:
  """The ``level`` percentile interval of bootstrap statistics ``boot [num]``."""
  if not 0 < level < 1:
    raise ValueError(f"level must be in (0, 1), got {level}.")
  low, high = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
  return float(low), float(high)


def median_interval(sizes, *, num: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
  """``{"median", "low", "high", "count"}`` of ``sizes [n]``: the median and its
  ``level`` bootstrap interval (None for no images)."""
  sizes = np.asarray(sizes, np.float64)
  if sizes.ndim != 1:
    raise ValueError(f"sizes must be 1-D (one per image), got shape {sizes.shape}.")
  if len(sizes) == 0:
    return {"median": None, "low": None, "high": None, "count": 0}
  low, high = _percentile_interval(
      np.median(sizes[_resampled(len(sizes), num, seed)], axis=1), level)
  return {"median": float(np.median(sizes)), "low": low, "high": high,
          "count": int(len(sizes))}


def paired_difference(a, b, *, num: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
  """The difference of medians ``median(a) - median(b)`` of two models' sizes on the same
  images (``a[i]``, ``b[i]`` of image ``i``), with a bootstrap interval that resamples
  images (pairs) jointly; also the median of the per-image differences and the fraction
  of images where ``a`` is larger."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired sizes must be 1-D and of one shape, got {a.shape} and {b.shape}.")
  if len(a) == 0:
    return {"difference": None, "low": None, "high": None, "count": 0,
            "median_paired_difference": None, "fraction_larger": None}
  idx = _resampled(len(a), num, seed)
  low, high = _percentile_interval(np.median(a[idx], axis=1) - np.median(b[idx], axis=1), level)
  return {"difference": float(np.median(a) - np.median(b)), "low": low,
          "high": high, "count": int(len(a)),
          "median_paired_difference": float(np.median(a - b)),
          "fraction_larger": float((a > b).mean())}
