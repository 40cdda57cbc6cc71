"""The array form every data source returns: images, labels and class names."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class LabelledImages:
  """One split of a labelled image dataset.

  Attributes:
    images: ``[N, H, W, C]`` uint8 (raw pixels, 0–255).
    labels: ``[N]`` int32 in ``[0, len(class_names))``.
    class_names: class name of each label index.
    ids: ``[N]`` the dataset's own key of each image (TFDS's ``id``), or None.
  """
  images: np.ndarray
  labels: np.ndarray
  class_names: tuple[str, ...]
  ids: Optional[tuple[str, ...]] = None

  def __len__(self) -> int:
    return len(self.labels)

  def class_counts(self) -> dict[str, int]:
    """Number of images of each class, in label order."""
    counts = np.bincount(self.labels, minlength=len(self.class_names))
    return {name: int(c) for name, c in zip(self.class_names, counts)}
