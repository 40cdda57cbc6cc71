"""SISes from records, the statistics of their sizes: medians with bootstrap intervals,
paired differences between models.

Pure functions of records and of arrays of sizes (pixels), one entry per image; the same images
in the same order for every model when differences are taken. Intervals are
percentile bootstrap intervals over images: resample the images with replacement
``num`` times (seeded), recompute the statistic, take the ``(1 - level) / 2`` and
``(1 + level) / 2`` quantiles.
"""
from __future__ import annotations

import numpy as np

from overinterp_jax import sis


def sis_of(rec: dict, threshold: float) -> sis.SISBatch:
  """The SISes at ``threshold`` of backward-selection records (``order``, ``values [n, d]``,
  ``targets``, ``original_scores``)."""
  return sis.sis_from_backselect(
      sis.BackselectResult(rec["targets"], rec["original_scores"], rec["order"], rec["values"]),
      threshold)


def size_stats(sizes_px: np.ndarray, exists: np.ndarray, num_pixels: int) -> dict:
  """Count, fraction with a SIS, median and quartiles (pixels and percent of
  ``num_pixels``) of the sizes ``sizes_px [n]`` of the images with a SIS (``exists [n]``)."""
  s = sizes_px[exists]
  if len(s) == 0:
    return {"count": 0, "fraction_with_sis": 0.0}
  q1, med, q3 = np.percentile(s, [25, 50, 75])
  return {"count": int(len(s)), "fraction_with_sis": float(exists.mean()),
          "median_pixels": float(med), "q1_pixels": float(q1), "q3_pixels": float(q3),
          "median_percent": float(100 * med / num_pixels),
          "mean_percent": float(100 * s.mean() / num_pixels)}


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
