"""Batch preprocessing steps of ``loader.Feed.batch``, each a function of arrays.

A batch is built as: read (``sources.Source.gather``, or per example the view and the
training crop of ``transforms``) -> ``mirror`` -> normalise (``Normalization``) ->
``mask`` or ``positions``. Each step takes a batch and returns one of the same shape.
"""
from __future__ import annotations

import numpy as np


def mirror(flips: np.ndarray, x: np.ndarray) -> np.ndarray:
  """``x [b, H, W, ...]`` with examples ``flips [b]`` bool mirrored left-right."""
  flips = np.asarray(flips, bool).reshape((-1,) + (1,) * (x.ndim - 1))
  return np.where(flips, x[:, :, ::-1], x)


def mask(x: np.ndarray, masks: np.ndarray, fill) -> np.ndarray:
  """``x [b, H, W, C]`` float32 with the pixels off in ``masks [b, H, W]`` bool set to
  ``fill`` (a scalar or ``[b, H, W, C]``): float32."""
  return np.where(masks[..., None], x, fill).astype(np.float32)


def positions(masks: np.ndarray, shape: tuple) -> np.ndarray:
  """``masks [b, H, W]`` bool as inputs of ``shape`` ``[b, H, W, C]``: 1.0 at kept pixels
  in every channel, else 0.0 (the kept positions only, no pixel values)."""
  return np.broadcast_to(masks[..., None], shape).astype(np.float32)
