"""Pixel-subset images built lazily, batch by batch, from uint8 images and masks.

A 5% pixel-subset image keeps the pixels of its mask and shows the masked
value elsewhere (zero after normalisation, the dataset mean). ``MaskedImages``
stores the uint8 images and boolean masks and builds normalised float32
batches on indexing, so 50,000 subset images cost no extra float copy.

Augmentation: training crops and flips the *built* subset image with zero
padding. With masks padded as False this is the same as cropping and
flipping the image and its mask together, then masking (docs/method.md §6.1),
and it happens afresh every epoch.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

MASKING_VALUES = ("mean", "blur", "noise")


class MaskedImages:
  """Array-like ``[N, H, W, C]`` float32 view of masked images.

  Args:
    images: ``[N, H, W, C]`` uint8.
    masks: ``[N, H, W]`` bool, True = pixel kept.
    prepare: uint8 -> normalised float32.
    mask_only: True replaces kept pixels by the constant 1.0 in every channel
      (positions only, no pixel values); masked pixels stay 0.
    fully_masked: optional ``[N, H, W, C]`` float32 masked values (normalised),
      default zeros.
  """

  def __init__(self, images: np.ndarray, masks: np.ndarray, prepare: Callable, *,
               mask_only: bool = False, fully_masked: Optional[np.ndarray] = None):
    if images.ndim != 4 or masks.shape != images.shape[:3]:
      raise ValueError(f"masks {masks.shape} must be [N, H, W] of images {images.shape}.")
    if fully_masked is not None and fully_masked.shape != images.shape:
      raise ValueError(f"fully_masked {fully_masked.shape} must match images {images.shape}.")
    self.images, self.masks, self.prepare = images, masks.astype(bool), prepare
    self.mask_only, self.fully_masked = mask_only, fully_masked

  def __len__(self) -> int:
    return len(self.images)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.images.shape

  def __getitem__(self, idx) -> np.ndarray:
    m = self.masks[idx][..., None]
    if self.mask_only:
      return np.broadcast_to(m, m.shape[:-1] + self.images.shape[-1:]).astype(np.float32)
    x = self.prepare(self.images[idx])
    fm = np.float32(0) if self.fully_masked is None else self.fully_masked[idx]
    return np.where(m, x, fm).astype(np.float32)


def _gaussian_kernel(sigma: float) -> np.ndarray:
  radius = max(1, int(round(3 * sigma)))
  x = np.arange(-radius, radius + 1, dtype=np.float32)
  k = np.exp(-0.5 * (x / sigma) ** 2)
  return k / k.sum()


@jax.jit
def _blur(images: jax.Array, kernel: jax.Array) -> jax.Array:
  """Separable Gaussian blur of ``[N, H, W, C]`` with reflect padding."""
  r = kernel.shape[0] // 2
  x = jnp.pad(images, ((0, 0), (r, r), (r, r), (0, 0)), mode="reflect")
  h, w = images.shape[1:3]
  x = sum(kernel[i] * x[:, i:i + h] for i in range(kernel.shape[0]))
  return sum(kernel[i] * x[:, :, i:i + w] for i in range(kernel.shape[0]))


def fully_masked_values(kind: str, images: np.ndarray, *, seed: int = 0,
                        blur_sigma: float = 2.0, noise_scale: float = 1.0,
                        indices: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
  """The masked value of each image, ``[N, H, W, C]`` float32 (normalised), or None for zeros.

  ``kind``: ``"mean"`` (the dataset mean: zeros, the paper's choice), ``"blur"``
  (a Gaussian-blurred copy of the image, ``blur_sigma`` pixels) or ``"noise"``
  (uniform noise in ``[-noise_scale, noise_scale]`` from a fixed key; image
  ``i``'s noise depends only on ``seed`` and ``indices[i]``, default ``i``).
  """
  if kind == "mean":
    return None
  if kind == "blur":
    return np.asarray(_blur(jnp.asarray(images, jnp.float32),
                            jnp.asarray(_gaussian_kernel(blur_sigma))))
  if kind == "noise":
    indices = np.arange(images.shape[0]) if indices is None else np.asarray(indices)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.asarray(indices))
    noise = jax.vmap(lambda k: jax.random.uniform(k, images.shape[1:], jnp.float32,
                                                  -noise_scale, noise_scale))(keys)
    return np.asarray(noise)
  raise ValueError(f"masking value must be one of {MASKING_VALUES}, got {kind!r}.")


def dilate(masks: np.ndarray, k: int) -> np.ndarray:
  """``[N, H, W]`` bool masks grown by a ``k × k`` neighbourhood (k odd; 1 = unchanged)."""
  if k < 1 or k % 2 == 0:
    raise ValueError(f"dilation size must be a positive odd integer, got {k}.")
  r = k // 2
  padded = np.pad(np.asarray(masks, bool), ((0, 0), (r, r), (r, r)))
  h, w = masks.shape[1:]
  out = np.zeros(masks.shape, bool)
  for dy in range(k):
    for dx in range(k):
      out |= padded[:, dy:dy + h, dx:dx + w]
  return out


def pack_masks(masks: np.ndarray) -> np.ndarray:
  """``[N, H, W]`` bool -> packed uint8 bits (8x smaller on disk)."""
  return np.packbits(np.asarray(masks, bool), axis=-1)


def unpack_masks(packed: np.ndarray, width: int) -> np.ndarray:
  return np.unpackbits(packed, axis=-1, count=width).astype(bool)
