"""Features: which input entries are masked together.

A *feature map* is an integer array of the mask's shape ``M`` whose entries
name the feature each mask position belongs to (``0 .. d-1``). ``M`` has the
input's number of dimensions and broadcasts onto the input shape ``D``; e.g.
for an image ``[H, W, C]`` the pixel map has shape ``[H, W, 1]`` (one feature
per pixel, all channels together) and a superpixel map assigns one id to many
pixels. ``None`` stands for the identity map ``arange(d).reshape(M)``, which
is handled without a gather.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def mask_shape_for(input_shape: tuple[int, ...], mask_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Left-pads ``mask_shape`` with 1s to the input's rank, checking it broadcasts.

  Raises:
    ValueError: if the mask does not broadcast onto the input.
  """
  if len(mask_shape) > len(input_shape):
    raise ValueError(
        f"Mask shape {mask_shape} has more dimensions than the input shape {input_shape}.")
  padded = (1,) * (len(input_shape) - len(mask_shape)) + tuple(mask_shape)
  for m, s in zip(padded, input_shape):
    if m not in (1, s):
      raise ValueError(
          f"Mask shape {tuple(mask_shape)} does not broadcast onto the input shape "
          f"{tuple(input_shape)}: each mask axis must be 1 or equal the input's.")
  return padded


def pixel_feature_map(height: int, width: int) -> np.ndarray:
  """The identity feature map of an ``[H, W, C]`` image: ``[H, W]`` int32, row-major ids."""
  return np.arange(height * width, dtype=np.int32).reshape(height, width)


def patch_feature_map(height: int, width: int, patch: int) -> np.ndarray:
  """``[H, W]`` int32 feature ids of ``patch × patch`` squares, row-major (``patch`` must
  divide both sides; 1 gives ``pixel_feature_map``)."""
  rows, cols = np.arange(height) // patch, np.arange(width) // patch
  return (rows[:, None] * (width // patch) + cols[None, :]).astype(np.int32)


def validate_feature_map(feature_map, spatial_shape: tuple[int, int]) -> tuple[np.ndarray, int]:
  """Checks an image feature map and returns it as ``[H, W, 1]`` int32 plus ``d``.

  Args:
    feature_map: ``[H, W]`` integer array; values ``0 .. d-1``, each used at least once.
    spatial_shape: ``(H, W)`` of the images.

  Raises:
    ValueError: wrong shape, non-integer dtype, negative ids, or unused ids.
  """
  fmap = np.asarray(feature_map)
  if fmap.shape != tuple(spatial_shape):
    raise ValueError(
        f"feature_map has shape {fmap.shape}; it must be [H, W] = {tuple(spatial_shape)} "
        "to match the images.")
  if not np.issubdtype(fmap.dtype, np.integer):
    raise ValueError(f"feature_map must hold integer feature ids, got dtype {fmap.dtype}.")
  if fmap.min() < 0:
    raise ValueError(f"feature_map has negative feature id {int(fmap.min())}; ids must be >= 0.")
  d = int(fmap.max()) + 1
  used = np.bincount(fmap.ravel(), minlength=d)
  if np.any(used == 0):
    missing = np.flatnonzero(used == 0)[:5].tolist()
    raise ValueError(
        f"feature_map ids must be 0..{d - 1} with every id used; ids {missing} have no "
        "pixel (renumber the map contiguously).")
  return fmap.astype(np.int32)[..., None], d


def expand_presence(present: jnp.ndarray, feature_map: jnp.ndarray | None,
                    mask_shape: tuple[int, ...]) -> jnp.ndarray:
  """Feature presence ``[B, d]`` bool -> mask-shaped presence ``[B, *M]`` bool."""
  if feature_map is None:
    return present.reshape((present.shape[0],) + tuple(mask_shape))
  return jnp.take(present, feature_map, axis=1)


def apply_presence(x: jnp.ndarray, fully_masked: jnp.ndarray, keep: jnp.ndarray) -> jnp.ndarray:
  """``where(keep, x, fully_masked)``; ``keep: [B, *M]`` broadcasts onto ``x: [B, *D]``."""
  return jnp.where(keep, x, fully_masked)
