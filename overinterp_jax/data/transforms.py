"""Per-image preprocessing on the host (numpy + PIL), for images of any size.

  * ``ViewSpec(size, resize, torchvision)``: the *analysis view* of an image: shorter
    side resized to ``resize`` (bilinear, antialiased), then a centred ``size × size``
    crop. ``size = 0`` leaves images as they are (CIFAR: every image is 32×32).
    SIS, pixel-subsets and evaluation all work on this view. With ``torchvision``
    it is bit for bit torchvision's ``Resize(resize)`` + ``CenterCrop(size)`` of a
    PIL RGB image: long side ``int(resize · long / short)`` (truncated), crop offset
    ``int(round((n − size) / 2))`` (Python's round: halves to even), zero padding
    when the crop is larger than the image. Without it (the ``"sizes"`` view of
    runs made before the named views): long side rounded, offset ``(n − size) // 2``.
  * ``resolve_view``: ``config.data.view`` -> a ``ViewSpec``: ``"torchvision"`` (the
    evaluation transform the torchvision/timm weights were measured with: ResNet-50
    256 → 224, Inception v3 342 → 299), ``"paper"`` (the paper's public code, also
    torchvision: Inception v3 299 → 299, ResNet-50 256 → 224), ``"sizes"``
    (``data.view_size`` / ``data.view_resize``, rounded), ``"auto"`` (torchvision's for
    weights from a torchvision/timm file; else the sizes when given, else the paper's).
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


VIEWS = ("auto", "torchvision", "paper", "sizes")
# (resize, crop) of torchvision's evaluation transform for its pretrained weights.
TORCHVISION_SIZES = {"resnet50": (256, 224), "inception_v3": (342, 299)}
# (resize, crop) of the paper's public code (torchvision transforms, docs/imagenet.md).
PAPER_SIZES = {"resnet50": (256, 224), "inception_v3": (299, 299)}


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """``size``: side of the square view (0 = the image as it is); ``resize``: shorter side
  before the centre crop (0 = ``size``); ``torchvision``: torchvision's arithmetic
  (module docstring); ``name``: the ``config.data.view`` it came from (for reports)."""
  size: int = 0
  resize: int = 0
  torchvision: bool = False
  name: str = "sizes"

  def shape(self, fixed: Optional[tuple] = None) -> Optional[tuple]:
    """``(H, W, 3)`` of views, or ``fixed`` (the source's shape) when ``size == 0``."""
    return (self.size, self.size, 3) if self.size else fixed

  def describe(self) -> str:
    """One phrase for reports, e.g. ``view "torchvision": Resize(342), CenterCrop(299)
    (torchvision's arithmetic)``."""
    if not self.size:
      return f'view "{self.name}": images as stored'
    how = ("torchvision's arithmetic" if self.torchvision
           else "long side rounded, crop offset floored")
    return (f'view "{self.name}": Resize({self.resize or self.size}), '
            f"CenterCrop({self.size}) ({how})")


def resolve_view(view: str, size: int, resize: int, model_name: str,
                 torch_weights: bool) -> ViewSpec:
  """The ``ViewSpec`` of ``config.data.view`` (one of ``VIEWS``).

  Args:
    view: ``"torchvision"`` / ``"paper"``: torchvision's arithmetic at the sizes of
      ``TORCHVISION_SIZES`` / ``PAPER_SIZES`` for ``model_name``, or at ``size`` and
      ``resize`` when ``size`` is set; ``"sizes"``: ``size`` and ``resize`` with
      the rounded arithmetic; ``"auto"``: ``"torchvision"`` when ``torch_weights``, else
      ``"sizes"`` when ``size`` is set, else ``"paper"`` for a model that has a paper
      view, else ``"sizes"``.
    size, resize: ``config.data.view_size`` / ``view_resize`` (0 = unset).
    model_name: ``config.model.name``.
    torch_weights: ``config.model.weights`` is a torchvision/timm file.

  Raises:
    ValueError: an unknown view, or a named view without sizes for a model it does not
      know.
  """
  if view not in VIEWS:
    raise ValueError(f"config.data.view must be one of {list(VIEWS)}, got {view!r}.")
  asked = view
  if view == "auto":
    view = ("torchvision" if torch_weights else "sizes" if size
            else "paper" if model_name in PAPER_SIZES else "sizes")
  if view == "sizes":
    return ViewSpec(int(size), int(resize))
  table = TORCHVISION_SIZES if view == "torchvision" else PAPER_SIZES
  if model_name not in table and not size:
    raise ValueError(f"config.data.view={asked!r} (the {view!r} view) has sizes for "
                     f"config.model.name in {sorted(table)}, not {model_name!r}: set "
                     "config.data.view_size (and view_resize).")
  if size:
    return ViewSpec(int(size), int(resize) or int(size), torchvision=True, name=view)
  want_resize, want_size = table[model_name]
  return ViewSpec(want_size, want_resize, torchvision=True, name=view)


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
  if spec.torchvision:
    return _torchvision_view(image, spec.size, spec.resize or spec.size)
  short = spec.resize or spec.size
  h, w = image.shape[:2]
  scale = short / min(h, w)
  nh, nw = max(short, round(h * scale)), max(short, round(w * scale))
  image = _resize(image, nh, nw)
  top, left = (nh - spec.size) // 2, (nw - spec.size) // 2
  return image[top:top + spec.size, left:left + spec.size]


def _torchvision_view(image: np.ndarray, size: int, resize: int) -> np.ndarray:
  """torchvision's ``Resize(resize)`` then ``CenterCrop(size)`` of ``image [H, W, 3]``
  uint8 (``transforms.functional``'s PIL path), bit for bit."""
  h, w = image.shape[:2]
  short, long = (w, h) if w <= h else (h, w)
  new_long = int(resize * long / short)
  nh, nw = (new_long, resize) if w <= h else (resize, new_long)
  image = _resize(image, nh, nw)
  pad_h, pad_w = max(size - nh, 0), max(size - nw, 0)
  if pad_h or pad_w:  # zeros, the extra pixel of an odd padding at the bottom/right
    image = np.pad(image, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2),
                           (0, 0)))
    nh, nw = image.shape[:2]
  top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
  return image[top:top + size, left:left + size]


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
