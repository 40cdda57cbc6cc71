"""Per-channel normalisation: uint8 pixels -> zero-mean, unit-variance float32, and back.

``x = (pixels / 255 - mean) / std`` with ``mean``, ``std`` ``[C]`` in [0, 1]
units. In normalised space 0 is the mean colour, the paper's masked value.
Works on numpy and jax arrays alike.
"""
from __future__ import annotations

import dataclasses

import numpy as np

# The constants of the paper's code (torchvision CIFAR-10 statistics).
CIFAR10_MEAN = np.array((125.3, 123.0, 113.9), np.float32) / 255.0
CIFAR10_STD = np.array((63.0, 62.1, 66.7), np.float32) / 255.0


@dataclasses.dataclass(frozen=True, eq=False)
class Normalization:
  """``mean``, ``std``: ``[C]`` float32 in [0, 1] units (pixel value / 255)."""
  mean: np.ndarray
  std: np.ndarray

  def __post_init__(self):
    mean = np.asarray(self.mean, np.float32).reshape(-1)
    std = np.asarray(self.std, np.float32).reshape(-1)
    if mean.shape != std.shape:
      raise ValueError(f"mean {mean.shape} and std {std.shape} must have the same shape.")
    if np.any(std <= 0):
      raise ValueError(f"std must be > 0 in every channel, got {std}.")
    object.__setattr__(self, "mean", mean)
    object.__setattr__(self, "std", std)

  def normalize(self, images):
    """``images [..., C]`` uint8 (0–255) -> float32 ``(images / 255 - mean) / std``."""
    return (images.astype(np.float32) / np.float32(255.0) - self.mean) / self.std

  def denormalize(self, x):
    """Inverse of ``normalize`` for figures: ``[..., C]`` float32 in [0, 1] (clipped)."""
    out = x * self.std + self.mean
    return out.clip(0.0, 1.0).astype(np.float32)

  def to_dict(self) -> dict:
    return {"mean": self.mean.tolist(), "std": self.std.tolist()}


CIFAR10 = Normalization(CIFAR10_MEAN, CIFAR10_STD)
# torchvision's ImageNet statistics (its pretrained Inception v3 and ResNet-50).
IMAGENET = Normalization(np.array((0.485, 0.456, 0.406), np.float32),
                         np.array((0.229, 0.224, 0.225), np.float32))


def channel_stats(images: np.ndarray, chunk: int = 4096) -> Normalization:
  """Per-channel mean and (population) std of ``images [N, H, W, C]`` uint8.

  Accumulated in float64 over chunks of ``chunk`` images, so 50k CIFAR images
  need no float copy of the whole set. Returned in [0, 1] units.
  """
  if images.ndim != 4 or len(images) == 0:
    raise ValueError(f"channel_stats needs images [N, H, W, C] with N > 0, got {images.shape}.")
  total = np.zeros(images.shape[-1])
  total_sq = np.zeros(images.shape[-1])
  for start in range(0, len(images), chunk):
    block = images[start:start + chunk].astype(np.float64) / 255.0
    total += block.sum(axis=(0, 1, 2))
    total_sq += np.square(block).sum(axis=(0, 1, 2))
  count = images.shape[0] * images.shape[1] * images.shape[2]
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
  return Normalization(mean, np.maximum(std, 1e-6))
