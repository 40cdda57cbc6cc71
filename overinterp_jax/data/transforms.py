"""Per-image preprocessing on the host (numpy + PIL), for images of any size.

  * ``ViewSpec(size, resize)``: the *analysis view* of an image: shorter side
    resized to ``resize`` (bilinear, antialiased), then a centred ``size × size``
    crop — ImageNet evaluation (Inception v3: 342 → 299; ResNet-50: 256 → 224).
    ``size = 0`` leaves images as they are (CIFAR: every image is 32×32).
    SIS, pixel-subsets and evaluation all work on this view.
  * ``random_resized_crop``: Inception-style training crop (area 8–100%, aspect
    3/4–4/3, then resized to ``size``) with a horizontal flip; with a pixel mask
    (a subset of the view), the crop is taken of the view and the mask is cropped
    with it (nearest neighbour), so mask and image stay aligned.

Every random choice comes from a ``numpy.random.Generator`` the caller seeds per
example, so a batch does not depend on the worker that built it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """``size``: side of the square view (0 = the image as it is); ``resize``: shorter side
  before the centre crop (0 = ``size``)."""
  size: int = 0
  resize: int = 0

  def shape(self, fixed: Optional[tuple] = None) -> Optional[tuple]:
    """``(H, W, 3)`` of views, or ``fixed`` (the source's shape) when ``size == 0``."""
    return (self.size, self.size, 3) if self.size else fixed


def _resize(image: np.ndarray, height: int, width: int, nearest: bool = False) -> np.ndarray:
  if image.shape[:2] == (height, width):
    return image
  resample = Image.NEAREST if nearest else Image.BILINEAR
  if image.dtype == bool:
    return np.asarray(Image.fromarray(image.astype(np.uint8) * 255).resize(
        (width, height), Image.NEAREST)) > 127
  return np.asarray(Image.fromarray(image).resize((width, height), resample, reducing_gap=None))


def view(image: np.ndarray, spec: ViewSpec) -> np.ndarray:
  """``[H, W, 3]`` uint8 -> the analysis view ``[size, size, 3]`` (or ``image``, size 0)."""
  if not spec.size:
    return image
  short = spec.resize or spec.size
  h, w = image.shape[:2]
  scale = short / min(h, w)
  nh, nw = max(short, round(h * scale)), max(short, round(w * scale))
  image = _resize(image, nh, nw)
  top, left = (nh - spec.size) // 2, (nw - spec.size) // 2
  return image[top:top + spec.size, left:left + spec.size]


def crop_box(rng: np.random.Generator, height: int, width: int,
             scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """``(top, left, h, w)`` of an Inception-style random crop (10 tries, then centre crop)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(rng: np.random.Generator, image: np.ndarray, size: int,
                        mask: Optional[np.ndarray] = None, flip: bool = True
                        ) -> tuple[np.ndarray, Optional[np.ndarray]]:
  """A random crop of ``image [H, W, 3]`` uint8 (and of ``mask [H, W]`` bool, same box)
  resized to ``size × size``, mirrored with probability 1/2 when ``flip``."""
  top, left, h, w = crop_box(rng, *image.shape[:2])
  mirror = flip and rng.random() < 0.5
  out = _resize(image[top:top + h, left:left + w], size, size)
  out_mask = None
  if mask is not None:
    out_mask = _resize(mask[top:top + h, left:left + w], size, size, nearest=True)
  if mirror:
    out = out[:, ::-1]
    out_mask = None if out_mask is None else out_mask[:, ::-1]
  return np.ascontiguousarray(out), None if out_mask is None else np.ascontiguousarray(out_mask)
