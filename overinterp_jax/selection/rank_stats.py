"""Rank statistics of removal orders (benchmarks and the gradient-vs-exact control)."""
from __future__ import annotations

import numpy as np


def ranks(order: np.ndarray) -> np.ndarray:
  """``[N, d]`` removal orders -> each feature's removal position ``[N, d]``."""
  out = np.empty_like(order)
  np.put_along_axis(out, order, np.arange(order.shape[1])[None].repeat(len(order), 0), 1)
  return out


def spearman_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """``[N]`` Spearman correlation of each image's two removal orders (``[N, d]`` each)."""
  ra, rb = ranks(a).astype(float), ranks(b).astype(float)
  ra -= ra.mean(1, keepdims=True)
  rb -= rb.mean(1, keepdims=True)
  return (ra * rb).sum(1) / np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Mean over images of the Spearman correlation of two ``[N, d]`` removal orders."""
  return float(np.mean(spearman_per_image(a, b)))
