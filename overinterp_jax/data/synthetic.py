"""A small synthetic labelled image dataset for tests and smoke runs.

Each class has a fixed pattern: its own base colour (evenly spaced hues, so
even a model that only sees the mean colour can tell the classes apart) plus a
random low-frequency colour texture (a 4×4 grid upsampled to the image size,
so the spatial layout carries class information too). An example is its class
pattern plus a random brightness shift and per-pixel Gaussian noise. A tiny CNN
learns it in a few steps, and nearest-class-mean already separates the classes.
Everything is a function of ``seed`` (numpy ``Generator``, no global state).
"""
from __future__ import annotations

import numpy as np

from overinterp_jax.data.labelled import LabelledImages


def class_patterns(num_classes: int, image_size: int, channels: int, seed: int) -> np.ndarray:
  """``[num_classes, image_size, image_size, channels]`` float64 patterns (about 0–255).

  Base colour ``127.5 + 100·cos(θ_k − 2πc/3)`` per channel ``c`` (hue angle
  ``θ_k = 2πk/K`` + a seed-dependent offset) plus a ±30 texture.
  """
  rng = np.random.default_rng([seed, 0])
  theta = 2 * np.pi * np.arange(num_classes) / num_classes + rng.uniform(0, 2 * np.pi)
  phase = 2 * np.pi * np.arange(channels) / 3
  base = 127.5 + 100.0 * np.cos(theta[:, None] - phase[None, :])  # [K, C]
  grid = rng.uniform(-30.0, 30.0, size=(num_classes, 4, 4, channels))
  reps = -(-image_size // 4)
  texture = grid.repeat(reps, axis=1).repeat(reps, axis=2)[:, :image_size, :image_size]
  return base[:, None, None, :] + texture


def make_split(num_examples: int, *, image_size: int = 32, num_classes: int = 10,
               channels: int = 3, seed: int = 0, split_index: int = 0,
               noise_std: float = 15.0) -> LabelledImages:
  """``num_examples`` balanced examples; ``split_index`` picks an independent draw.

  Returns images ``[N, image_size, image_size, channels]`` uint8, labels
  ``[N]`` int32 (classes as equal as ``N`` allows, in shuffled order),
  class names ``class_0 … class_{K-1}``.
  """
  if num_examples < 1 or num_classes < 2 or image_size < 1:
    raise ValueError(f"make_split needs num_examples >= 1, num_classes >= 2 and image_size "
                     f">= 1; got {num_examples}, {num_classes}, {image_size}.")
  patterns = class_patterns(num_classes, image_size, channels, seed)
  rng = np.random.default_rng([seed, 1 + split_index])
  labels = rng.permutation(np.arange(num_examples) % num_classes).astype(np.int32)
  shift = rng.uniform(-20.0, 20.0, size=(num_examples, 1, 1, 1))
  noise = rng.normal(0.0, noise_std, size=(num_examples, image_size, image_size, channels))
  images = np.clip(patterns[labels] + shift + noise, 0, 255).round().astype(np.uint8)
  names = tuple(f"class_{k}" for k in range(num_classes))
  return LabelledImages(images, labels, names)


def make_synthetic(num_train: int = 256, num_test: int = 64, *, image_size: int = 32,
                   num_classes: int = 10, channels: int = 3,
                   seed: int = 0) -> dict[str, LabelledImages]:
  """``{'train': ..., 'test': ...}``: independent draws from the same class patterns."""
  kw = dict(image_size=image_size, num_classes=num_classes, channels=channels, seed=seed)
  return {"train": make_split(num_train, split_index=0, **kw),
          "test": make_split(num_test, split_index=1, **kw)}
