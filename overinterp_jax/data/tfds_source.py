"""CIFAR-10 and ImageNet through tensorflow-datasets, for data already prepared in ``data_dir``.

Reads the array_record files of a prepared TFDS dataset with
``tfds.data_source`` (random access, no TensorFlow needed) and never
downloads (``download=False``). Prepare the data once, with the ``prepare`` extra
(TensorFlow, apache-beam, mlcroissant; docs/data.md), e.g.

    tfds build cifar10 --data_dir=/data/tfds --file_format=array_record

(ImageNet needs its archives placed in the manual download directory first.)
"""
from __future__ import annotations

import os
from typing import Any, Optional

SUPPORTED = ("cifar10", "imagenet2012")
# The split used as the test set: ImageNet's test labels are not public.
EVAL_SPLIT = {"cifar10": "test", "imagenet2012": "validation"}


def _check_prepared(name: str, data_dir: Optional[str]) -> None:
  """Fails fast (before importing TFDS) unless ``data_dir/name`` exists."""
  if name not in SUPPORTED:
    raise ValueError(f"Unsupported TFDS dataset {name!r}; supported: {list(SUPPORTED)}.")
  if not data_dir:
    raise ValueError(f"TFDS dataset {name!r} needs data_dir, the folder where it was prepared "
                     f"(this code never downloads); e.g. `tfds build {name} "
                     "--data_dir=DIR --file_format=array_record`.")
  if not os.path.isdir(os.path.join(data_dir, name)):
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared in data_dir {data_dir!r}: no folder "
        f"{os.path.join(data_dir, name)}. Prepare it with `tfds build {name} "
        f"--data_dir={data_dir} --file_format=array_record` (this code never downloads).")


def tfds_data_source(name: str, split: str, data_dir: str) -> Any:
  """The random-access source of a prepared split (a sequence of feature dicts).

  Each element is ``{'image': [H, W, 3] uint8, 'label': int, ...}``; hand the
  source to grain for large datasets such as ImageNet.

  Raises:
    ValueError / FileNotFoundError: unsupported name, no ``data_dir``, or the
      dataset is not prepared there (as array_record).
  """
  _check_prepared(name, data_dir)
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except  # TFDS raises many kinds here
    raise FileNotFoundError(
        f"Cannot open TFDS {name!r} split {split!r} in {data_dir!r}: {type(e).__name__}: {e}. "
        "The dataset must be prepared there in array_record format (tfds build "
        f"{name} --data_dir={data_dir} --file_format=array_record).") from e


def class_names(name: str, data_dir: str) -> tuple[str, ...]:
  """Label names of a prepared dataset, in label order."""
  _check_prepared(name, data_dir)
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  return tuple(tfds.builder(name, data_dir=data_dir).info.features["label"].names)


def example_key(example: dict) -> Optional[str]:
  """A record's own key: ``file_name`` (ImageNet, e.g. ``n01440764_10026.JPEG``) or ``id``
  (CIFAR-10, e.g. ``train_16399``); None if it has neither."""
  for key in ("file_name", "id"):
    value = example.get(key) if isinstance(example, dict) else None
    if value is not None:
      return value.decode() if isinstance(value, bytes) else str(value)
  return None
