"""Training augmentation in pure JAX: random crop (zero padding) + horizontal flip.

The paper's recipe (``RandomCrop(32, padding=4)`` then ``RandomHorizontalFlip``),
applied per image of a batch with ``vmap``, jit-able, keyed by an explicit
PRNG key. An image and its pixel mask get the **identical** crop and flip
(docs/method.md §6, decision 1), so a pixel subset stays aligned with its image.

Padding: images are expected in normalised space and padded with
``pad_value`` (default 0, the mean colour = the masked value); masks are padded
with False, so padded pixels count as masked. (The reference pads with black
in raw pixel space; padding with the masked value keeps a crop of a subset
image a valid subset image.)
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def _crop_flip(x: jax.Array, offsets: jax.Array, flip: jax.Array, padding: int,
               fill) -> jax.Array:
  """Pads ``x [H, W] or [H, W, C]`` by ``padding``, crops ``H × W`` at ``offsets``, flips."""
  x3 = x if x.ndim == 3 else x[..., None]
  h, w, c = x3.shape
  padded = jnp.pad(x3, ((padding, padding), (padding, padding), (0, 0)),
                   constant_values=jnp.asarray(fill, x3.dtype))
  out = jax.lax.dynamic_slice(padded, (offsets[0], offsets[1], 0), (h, w, c))
  out = jnp.where(flip, out[:, ::-1], out)
  return out if x.ndim == 3 else out[..., 0]


def random_crop_flip(key: jax.Array, image: jax.Array, mask: Optional[jax.Array] = None, *,
                     padding: int = 4, pad_value: float = 0.0,
                     flip_prob: float = 0.5) -> tuple[jax.Array, Optional[jax.Array]]:
  """One image (and optionally its mask) cropped and flipped identically.

  Args:
    key: PRNG key.
    image: ``[H, W, C]`` float32, normalised.
    mask: ``[H, W]`` or ``[H, W, 1]`` bool (True = pixel kept), or None.
    padding: pixels of padding on each side before the ``H × W`` crop.
    pad_value: value of padded image pixels (0 = masked value).
    flip_prob: probability of a horizontal flip.

  Returns:
    ``(image [H, W, C], mask of the input's shape or None)``.
  """
  if image.ndim != 3:
    raise ValueError(f"random_crop_flip expects image [H, W, C], got shape {image.shape}.")
  if mask is not None and mask.shape[:2] != image.shape[:2]:
    raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape}.")
  k_crop, k_flip = jax.random.split(key)
  offsets = jax.random.randint(k_crop, (2,), 0, 2 * padding + 1)
  flip = jax.random.bernoulli(k_flip, flip_prob)
  out = _crop_flip(image, offsets, flip, padding, pad_value)
  out_mask = None if mask is None else _crop_flip(mask, offsets, flip, padding, False)
  return out, out_mask


def augment_batch(key: jax.Array, images: jax.Array, masks: Optional[jax.Array] = None, *,
                  padding: int = 4, pad_value: float = 0.0, flip: bool = True
                  ) -> tuple[jax.Array, Optional[jax.Array]]:
  """``random_crop_flip`` with an independent draw per image (``flip=False``: crop only).

  ``images [B, H, W, C]`` float32, ``masks [B, H, W]`` / ``[B, H, W, 1]`` bool
  or None -> the same shapes. Image ``i`` uses ``jax.random.split(key, B)[i]``.
  """
  keys = jax.random.split(key, images.shape[0])
  fn = lambda k, x, m: random_crop_flip(k, x, m, padding=padding, pad_value=pad_value,
                                        flip_prob=0.5 if flip else 0.0)
  if masks is None:
    return jax.vmap(lambda k, x: fn(k, x, None)[0])(keys, images), None
  return jax.vmap(fn)(keys, images, masks)


def augment_images(key: jax.Array, images: jax.Array, *, padding: int = 4,
                   flip: bool = True) -> jax.Array:
  """``(key, images [B, H, W, C]) -> images``: the training step's ``augment_fn``.

  ``flip=False`` crops only (training's alternating flip flips on the host).
  """
  return augment_batch(key, images, padding=padding, flip=flip)[0]


def resize_images(images: jax.Array, height: int, width: int) -> jax.Array:
  """``images [B, H, W, C]`` -> ``[B, height, width, C]``: ``jax.image.resize``, linear,
  antialiased when downsampling. Training's progressive resizing uses it."""
  if images.shape[1:3] == (height, width):
    return images
  return jax.image.resize(images, (images.shape[0], height, width, images.shape[3]),
                          method="linear", antialias=True)
