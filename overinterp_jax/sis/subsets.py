"""From backward selection to SISes and pixel-subsets.

``sis_from_backselect`` reads the SIS of every image at a threshold
(``SISBatch``); ``keep_mask`` keeps the last-removed features and
``random_keep_mask`` (``draw_random_keep_mask``) uniformly random ones;
``feature_mask_to_pixels`` and ``apply_feature_mask`` turn feature masks into
pixel masks and masked images.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from overinterp_jax.selection import features, records
from overinterp_jax.sis.batched import BackselectResult
from overinterp_jax.sis.checks import check_threshold


class SISBatch(NamedTuple):
  """SISes of N images at one threshold.

  Fields:
    exists: ``[N]`` bool; False where the full image scores below the threshold.
    size: ``[N]`` int SIS size in features (0 where no SIS exists).
    mask: ``[N, d]`` bool feature mask, True on the SIS.
  """
  exists: np.ndarray
  size: np.ndarray
  mask: np.ndarray


def sis_from_backselect(result: BackselectResult, threshold: float, *,
                        probability: bool = True) -> SISBatch:
  """The SIS of every image at ``threshold`` from one backward selection.

  ``probability=True`` (softmax scores) requires ``threshold`` in [0, 1].
  """
  tau = check_threshold(threshold, probability=probability)
  values = np.asarray(result.values)
  if not np.all(np.isfinite(values)) or not np.all(np.isfinite(result.original_scores)):
    raise ValueError("The backselect result holds NaN or infinite scores.")
  exists = records.reaches(result.original_scores, tau)
  size = np.where(exists, records.sis_length(values, tau), 0)
  mask = records.keep_last_removed(result.order, size, values.shape[1])
  return SISBatch(exists=exists, size=size, mask=mask)


def keep_mask(result_or_order, frac_kept: float) -> np.ndarray:
  """``[N, d]`` bool masks keeping the last-removed ``ceil(frac_kept · d)`` features.

  ``frac_kept=0.05`` keeps 52 of 1,024 CIFAR pixels. Accepts a
  ``BackselectResult`` or its ``order`` array.
  """
  order = np.asarray(getattr(result_or_order, "order", result_or_order))
  if order.ndim != 2:
    raise ValueError(f"order must be [N, d], got shape {order.shape}.")
  d = order.shape[1]
  return records.keep_last_removed(order, records.pixels_to_keep(d, frac_kept), d)


def random_keep_mask(num_images: int, num_features: int, frac_kept: float,
                     seed: int) -> np.ndarray:
  """``[N, d]`` bool masks keeping ``ceil(frac_kept · d)`` uniformly random features.

  Deterministic in ``seed``; each image gets its own draw (the paper's random
  baseline). Uses numpy's PCG64 so subsets do not depend on the JAX backend.
  """
  return draw_random_keep_mask(np.random.default_rng(seed), num_images, num_features,
                               records.pixels_to_keep(num_features, frac_kept))


def draw_random_keep_mask(rng: np.random.Generator, num_images: int, num_features: int,
                          num_kept: int) -> np.ndarray:
  """``[N, d]`` bool masks keeping ``num_kept`` uniformly random features of each image,
  drawn from ``rng`` (``N · d`` uniforms, row by row). Successive draws from one
  generator continue its stream: masks drawn shard after shard equal one draw of all."""
  scores = rng.random((num_images, num_features))
  kept = np.argpartition(scores, num_features - num_kept, axis=1)[:, num_features - num_kept:]
  mask = np.zeros((num_images, num_features), bool)
  np.put_along_axis(mask, kept, True, axis=1)
  return mask


def feature_mask_to_pixels(feature_mask, feature_map=None, spatial_shape=None) -> np.ndarray:
  """``[N, d]`` feature masks -> ``[N, H, W]`` pixel masks.

  Give ``feature_map [H, W]``, or ``spatial_shape (H, W)`` for pixel features.
  """
  feature_mask = np.asarray(feature_mask)
  if feature_map is None:
    if spatial_shape is None:
      raise ValueError("Give feature_map or spatial_shape.")
    h, w = spatial_shape
    if feature_mask.shape[1] != h * w:
      raise ValueError(f"Feature masks have {feature_mask.shape[1]} features but the "
                       f"image has {h * w} pixels.")
    return feature_mask.reshape(-1, h, w)
  fmap, d = features.validate_feature_map(feature_map, np.shape(feature_map))
  if feature_mask.shape[1] != d:
    raise ValueError(f"Feature masks have {feature_mask.shape[1]} features but the "
                     f"feature_map defines {d}.")
  return feature_mask[:, fmap[..., 0]]


def apply_feature_mask(images, feature_mask, fully_masked=None, feature_map=None):
  """Masks images: kept features stay, the rest take ``fully_masked`` (default 0).

  Args:
    images: ``[N, H, W, C]``.
    feature_mask: ``[N, d]`` bool, True = kept.
    fully_masked: ``[H, W, C]`` or ``[N, H, W, C]``; default zeros.
    feature_map: ``[H, W]`` ids; default one feature per pixel.

  Returns:
    ``[N, H, W, C]`` array of the images' type (numpy in, numpy out).
  """
  xp = np if isinstance(images, np.ndarray) else jnp
  n, h, w, _ = images.shape
  feature_mask = np.asarray(feature_mask)
  if feature_mask.ndim != 2 or feature_mask.shape[0] != n:
    raise ValueError(f"feature_mask must be [N, d] with N = {n}, got {feature_mask.shape}.")
  pixels = feature_mask_to_pixels(feature_mask, feature_map, (h, w))
  fm = xp.zeros((), images.dtype) if fully_masked is None else xp.asarray(fully_masked)
  return xp.where(xp.asarray(pixels)[..., None], images, fm)
