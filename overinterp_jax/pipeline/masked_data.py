"""What masked pixels show, and masks grown by a neighbourhood.

A pixel-subset image keeps the pixels of its mask and shows the masked value
elsewhere: zero after normalisation (the dataset mean, the paper's choice), or
for the masking-value control a blurred copy of the image or noise
(``fully_masked_values``). The input pipeline builds subset images on the fly
(``data.loader.Feed.with_masks``). Augmentation crops and flips the *built*
subset image with zero padding; with masks padded as False this is the same as
cropping and flipping the image and its mask together, then masking
(docs/method.md §6.1), afresh every epoch.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from overinterp_jax import config_schema

MASKING_VALUES = config_schema.MASKING_VALUES


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
