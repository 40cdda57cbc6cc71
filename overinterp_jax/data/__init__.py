"""The train and test splits of any data source as one ``Dataset``.

``load_for_config(config.data, workdir)`` returns a ``Dataset``: two sources
(``sources.Source``: examples, class names, labels, example ids, batches by index), the
normalisation, the analysis view, ``prepare(images uint8) -> float32`` (normalised) and
``feed(split)``, the ``loader.Feed`` every stage reads (its device-side crop + flip is
``train.config_augment_fn(config)``, not part of the data). Held in memory
(``config.data.in_memory``; ``load_dataset``) the sources are ``sources.ArraySource``
caches of the decoded arrays; streamed (``load_streaming``) they read files or TFDS
records on demand.

Sources:
  * ``'image_folder'``: ``path`` = directory or ``.tar.gz`` of ``<split>/<class>/<image>``
    (``image_folder.py``; decoded once, cached as ``.npz`` in ``cache_dir``); an empty
    ``path`` is the 1,000-image CIFAR-10 test slice shipped in the package
    (``cifar10_slice.py``; no train images).
  * ``'tfds'``: ``name`` = ``cifar10`` prepared in ``data_dir`` (``tfds_source.py``).
  * ``'synthetic'``: class-pattern images for tests (``synthetic.py``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from overinterp_jax.data import (augment, cifar10_slice, image_folder, in_memory, loader, normalize,
                                 sources, synthetic, tfds_source, transforms)
from overinterp_jax.data.augment import augment_batch, augment_images, random_crop_flip
from overinterp_jax.data.image_folder import CIFAR10_CLASSES, CIFAR10_EXPECTED_COUNTS
from overinterp_jax.data.in_memory import (load_image_folder, load_image_folder_splits,
                                           load_tfds_splits)
from overinterp_jax.data.labelled import LabelledImages
from overinterp_jax.data.normalize import CIFAR10, Normalization, channel_stats
from overinterp_jax.data.synthetic import make_synthetic
from overinterp_jax.data.tfds_source import tfds_data_source
from overinterp_jax.store import hashing

SOURCES = ("image_folder", "tfds", "synthetic")
NORMALIZATIONS = ("auto", "cifar10", "imagenet", "train")
# Train images whose statistics give normalization "train" for streamed data.
STATS_SAMPLE = 2000


@dataclasses.dataclass(eq=False)
class Dataset:
  """The train and test splits as two sources (``sources.Source``) plus how to turn their
  images into model inputs: the one data type of every source.

  Held in memory (``config.data.in_memory``, and synthetic data or the shipped slice) the
  sources are ``sources.ArraySource``, a cache of the decoded arrays; streamed they read
  files or records on demand. Everything reads them through ``feed(split)``.

  Attributes:
    train, test: the splits (``sources.Source``).
    normalization: per-channel mean/std used by ``prepare``.
    view: the analysis view of every image (``transforms.ViewSpec``; size 0 = as stored).
    workers: grain worker processes decoding batches of streamed data.
  """
  train: sources.Source
  test: sources.Source
  normalization: Normalization
  view: transforms.ViewSpec = transforms.ViewSpec()
  workers: int = 0

  @classmethod
  def from_arrays(cls, train: LabelledImages, test: LabelledImages,
                  normalization: Normalization) -> "Dataset":
    """Splits decoded into memory (ids None = ``"<split>/<index>"``)."""
    return cls(*(sources.ArraySource(d.images, d.labels, d.class_names, split, d.ids)
                 for split, d in (("train", train), ("test", test))), normalization)

  @property
  def in_memory(self) -> bool:
    """Whether both splits are held in memory (``sources.ArraySource``)."""
    return all(getattr(src, "in_memory", False) for src in (self.train, self.test))

  @property
  def class_names(self) -> tuple[str, ...]:
    return tuple(self.train.class_names if len(self.train) else self.test.class_names)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of the model inputs: the view's, else the stored images' (in memory:
    the train split's arrays, which also say it when the split is empty)."""
    return self.feed("train" if self.in_memory else "test").image_shape

  def prepare(self, images: np.ndarray) -> np.ndarray:
    """``[B, H, W, C]`` uint8 -> normalised float32 (0 = mean colour = masked value)."""
    return self.normalization.normalize(images)

  def source(self, split: str) -> sources.Source:
    return self.train if split == "train" else self.test

  def labels(self, split: str) -> np.ndarray:
    return np.asarray(self.source(split).labels)

  def num_examples(self, split: str) -> int:
    return len(self.source(split))

  def feed(self, split: str) -> "loader.Feed":
    """``split`` (``"train"`` or ``"test"``) as a ``loader.Feed`` of normalised images."""
    return loader.Feed(self.source(split), self.prepare, view=self.view, workers=self.workers)

  def fingerprint_parts(self) -> tuple:
    """What identifies the loaded data beyond its config: shapes (in memory) or counts,
    input shape and view (streamed), and the labels."""
    checksum = hashing.checksum({"y": self.labels("train"), "t": self.labels("test")})
    if self.in_memory:
      return (self.train.images.shape, self.test.images.shape, checksum)
    return (len(self.train), len(self.test), self.image_shape, checksum,
            dataclasses.asdict(self.view))

  # The whole-split arrays of data held in memory (tests, small-data tools); streamed data
  # has none: read it through ``feed(split)``.
  train_images = property(lambda self: self._array("train", "images"))
  test_images = property(lambda self: self._array("test", "images"))
  train_labels = property(lambda self: self._array("train", "labels"))
  test_labels = property(lambda self: self._array("test", "labels"))
  train_ids = property(lambda self: self._array("train", "ids"))
  test_ids = property(lambda self: self._array("test", "ids"))

  def _array(self, split: str, what: str):
    src = self.source(split)
    if not getattr(src, "in_memory", False):
      raise TypeError(f"The {split} split is streamed (config.data.in_memory=False): it has no "
                      f"whole-split {what}; read it through dataset.feed({split!r}).")
    return getattr(src, what)


def _normalization(kind: str, train: LabelledImages) -> Normalization:
  """``'cifar10'`` constants, ``'train'`` statistics, or ``'auto'``: CIFAR-10 constants
  for 32×32 RGB images with the CIFAR-10 classes, else the training set's statistics."""
  if kind == "auto":
    is_cifar = (train.class_names == CIFAR10_CLASSES and train.images.shape[1:] == (32, 32, 3))
    kind = "cifar10" if is_cifar else "train"
  if kind == "cifar10":
    return CIFAR10
  if kind == "imagenet":
    return normalize.IMAGENET
  if kind == "train":
    return channel_stats(train.images)
  raise ValueError(f"normalization must be one of {list(NORMALIZATIONS)}, got {kind!r}.")


def load_dataset(source: str, *, path: Optional[str] = None, name: str = "cifar10",
                 data_dir: Optional[str] = None, cache_dir: Optional[str] = None,
                 expected_counts=None, num_train: int = 256, num_test: int = 64,
                 image_size: int = 32, num_classes: int = 10, seed: int = 0,
                 normalization: str = "auto", progress: bool = True,
                 folder_splits: tuple[str, str] = ("train", "test")) -> Dataset:
  """Loads train and test splits from ``source`` (see the module docstring).

  Args:
    source: ``'image_folder'``, ``'tfds'`` or ``'synthetic'``.
    path: image folder or archive (image_folder); empty: the shipped CIFAR-10 test slice.
    name: TFDS dataset name (tfds; only ``cifar10`` fits in memory).
    data_dir: TFDS data directory holding the prepared dataset (tfds).
    cache_dir: decoded-array cache (image_folder); None = no cache.
    expected_counts: per-split counts to verify (image_folder, tfds).
    num_train, num_test, image_size, num_classes, seed: synthetic data.
    normalization: ``'auto'``, ``'cifar10'`` or ``'train'`` (see ``_normalization``).
    folder_splits: the sub-folders of ``path`` read as the train and test splits.
  """
  if source == "image_folder" and not path:
    splits = cifar10_slice.load(expected_counts)
  elif source == "image_folder":
    train_dir, test_dir = folder_splits
    loaded = load_image_folder_splits(path, tuple(dict.fromkeys(folder_splits)),
                                      cache_dir=cache_dir, progress=progress,
                                      expected_counts=_by_folder(expected_counts, folder_splits))
    splits = {"train": loaded[train_dir], "test": loaded[test_dir]}
  elif source == "tfds":
    tfds_splits = ("train", tfds_source.EVAL_SPLIT.get(name, "test"))
    if expected_counts:  # before decoding (a minute for CIFAR-10)
      _check_counts({split: len(tfds_data_source(name, tfds_split, data_dir))
                     for split, tfds_split in zip(("train", "test"), tfds_splits)},
                    expected_counts)
    loaded = load_tfds_splits(name, data_dir, tfds_splits, progress=progress)
    splits = {"train": loaded[tfds_splits[0]], "test": loaded[tfds_splits[1]]}
  elif source == "synthetic":
    splits = make_synthetic(num_train, num_test, image_size=image_size,
                            num_classes=num_classes, seed=seed)
  else:
    raise ValueError(f"Unknown data source {source!r}; known: {list(SOURCES)}.")
  train, test = splits["train"], splits["test"]
  return Dataset.from_arrays(train, test, _normalization(normalization, train))


def _check_counts(counts: dict[str, int], expected_counts) -> None:
  """Raises ValueError unless each split of ``counts`` (``{"train"/"test": images}``) has
  ``expected_counts[split]`` images (a total or ``{class: count}``; absent or 0 = unchecked)."""
  for split, n in counts.items():
    expected = (expected_counts or {}).get(split)
    expected = sum(expected.values()) if isinstance(expected, dict) else expected
    if expected and n != expected:
      raise ValueError(f"The {split} split has {n} images, config.data.expected_{split}"
                       f" = {expected}.")


def _by_folder(expected_counts, folder_splits):
  """Expected counts keyed by split (``train``/``test``) -> keyed by folder name."""
  if not expected_counts:
    return expected_counts
  return {folder: expected_counts[split] for split, folder in zip(("train", "test"), folder_splits)
          if split in expected_counts}


def view_for_config(config) -> transforms.ViewSpec:
  """The analysis view of ``config`` (``config.data.view``, ``transforms.resolve_view``):
  ``"auto"`` is torchvision's view when ``config.model.weights`` is a file (torchvision/
  timm ``.safetensors``; a directory is a training work directory of ours)."""
  weights = config.model.weights
  return transforms.resolve_view(config.data.view, int(config.data.view_size),
                                 int(config.data.view_resize), config.model.name,
                                 bool(weights) and not os.path.isdir(weights))


def load_streaming(data_config, workdir: str, progress: bool = True,
                   workers: int = 0, view: Optional[transforms.ViewSpec] = None,
                   bad_files: str = "check", max_bad_files: int = 100) -> Dataset:
  """The splits of ``data_config`` as sources read on demand (``data.in_memory = False``).

  Image folders are listed (archives extracted once into ``cache_dir``), TFDS splits
  opened through ``tfds.data_source``; nothing is decoded until a batch asks for it.
  Normalisation ``"train"`` (or ``"auto"`` for data other than CIFAR-10) uses the
  statistics of ``STATS_SAMPLE`` seeded random train images. ``view``: the analysis
  view (``view_for_config(config)``); None = ``data_config``'s sizes (``"auto"``
  without a model). ``bad_files``, ``max_bad_files``: what unreadable image files do
  (``loader.screened``; ``config.runtime.bad_files``), checked before anything else.
  """
  if view is None:
    view = transforms.resolve_view(data_config.view, int(data_config.view_size),
                                   int(data_config.view_resize), "", False)
  cache_dir = data_config.cache_dir or os.path.join(workdir, "data_cache")
  if data_config.source == "image_folder":
    if not data_config.path:
      raise ValueError("config.data.in_memory=False streams an image folder or archive: set "
                       "config.data.path (the shipped CIFAR-10 slice is loaded in memory).")
    train_src, test_src = (sources.folder_source(data_config.path, folder, cache_dir, progress)
                           for folder in data_config.folder_splits)
  elif data_config.source == "tfds":
    name = data_config.name
    train_src, test_src = (sources.TfdsSource(name, split, data_config.data_dir)
                           for split in ("train", tfds_source.EVAL_SPLIT.get(name, "test")))
  else:
    raise ValueError(f"config.data.in_memory=False: source {data_config.source!r} cannot be "
                     "streamed; use image_folder or tfds (synthetic data is always in memory).")
  _check_counts({"train": len(train_src), "test": len(test_src)},
                {split: int(data_config[f"expected_{split}"]) for split in ("train", "test")})
  train_src, test_src = (loader.screened(src, split, bad_files, max_bad_files, progress)
                         for split, src in (("train", train_src), ("test", test_src)))
  kind = data_config.normalization
  cifar = train_src.class_names == CIFAR10_CLASSES and view.shape((32, 32, 3)) == (32, 32, 3)
  if kind == "auto":
    kind = "cifar10" if cifar else "train"
  if kind == "train":
    feed = loader.Feed(train_src, lambda x: x, view=view)
    pick = np.sort(np.random.default_rng(0).permutation(len(train_src))[:STATS_SAMPLE])
    norm = channel_stats(np.concatenate([feed.images(pick[i:i + 256])
                                         for i in range(0, len(pick), 256)]))
  else:
    norm = _normalization(kind, None)
  return Dataset(train_src, test_src, norm, view, int(workers))


def load_for_config(data_config, workdir: str, progress: bool = True,
                    workers: int = 0, view: Optional[transforms.ViewSpec] = None,
                    bad_files: str = "check", max_bad_files: int = 100) -> Dataset:
  """``load_dataset`` from a ``config.data`` ConfigDict (keys in config_schema.py).

  ``cache_dir`` empty = ``<workdir>/data_cache``; ``expected_train``/``expected_test``
  0 = unchecked. ``progress``: show decoding progress bars (``config.runtime.progress``);
  ``workers``: grain worker processes of streamed data (``config.runtime.data_workers``);
  ``view``: the analysis view of streamed data (``view_for_config(config)``);
  ``bad_files``, ``max_bad_files``: ``config.runtime``'s, for streamed data.
  """
  if not data_config.in_memory and data_config.source != "synthetic":
    return load_streaming(data_config, workdir, progress, workers, view, bad_files,
                          max_bad_files)
  d = data_config
  cache_dir = d.cache_dir or os.path.join(workdir, "data_cache")
  expected = {split: int(d[f"expected_{split}"]) for split in ("train", "test")}
  expected = {split: n for split, n in expected.items() if n > 0} or None
  return load_dataset(d.source, path=d.path, name=d.name, data_dir=d.data_dir or None,
                      cache_dir=cache_dir, expected_counts=expected,
                      num_train=d.num_train, num_test=d.num_test, image_size=d.image_size,
                      num_classes=d.num_classes, seed=d.synthetic_seed,
                      normalization=d.normalization, progress=progress,
                      folder_splits=tuple(d.folder_splits))


__all__ = [
    "Dataset", "LabelledImages", "NORMALIZATIONS", "Normalization", "SOURCES", "load_dataset",
    "load_for_config", "view_for_config",
    "load_image_folder", "load_image_folder_splits", "load_tfds_splits", "tfds_data_source",
    "make_synthetic", "channel_stats", "CIFAR10", "CIFAR10_CLASSES", "CIFAR10_EXPECTED_COUNTS",
    "augment_batch", "augment_images", "random_crop_flip",
    "augment", "cifar10_slice", "image_folder", "in_memory", "normalize", "synthetic",
    "tfds_source",
]
