"""Whole splits decoded into memory: the sources of ``sources.py`` read to the end once.

Data held in memory is a cache of the same sources streamed data reads: an image folder
is read through ``sources.FileSource`` (an archive is extracted into a temporary folder
first, as streamed data extracts it into ``cache_dir``: a gzip stream has no random
access), a TFDS split through ``sources.TfdsSource``. Both give the same images, labels
and example ids (``<split>/<class>/<file>``; TFDS's ``id`` or ``file_name``) whichever
way the data is read.

Decoding 60k JPEGs takes a while, so each image-folder split is decoded once and cached
as ``<cache_dir>/<source name>-<hash of its path>-<split>.npz`` (uint8 images, int32
labels, class names, example ids, a fingerprint of the source), written atomically
(``atomic.write_atomic``) and only once every requested split has passed its checks, so
a load that fails writes nothing. A cache file is used only if it passes validation
(readable, its format version, consistent shapes and dtypes, counts, classes, the
source's fingerprint, ``expected_counts``); otherwise it is rebuilt.
"""
from __future__ import annotations

import hashlib
import os
from typing import Optional, Sequence

import numpy as np
from absl import logging

from overinterp_jax.data import image_folder, sources, tfds_source
from overinterp_jax.data.image_folder import ExpectedCounts, check_split
from overinterp_jax.data.labelled import LabelledImages
from overinterp_jax.store import atomic

# 2: example ids stored (version 1 caches are rebuilt).
CACHE_FORMAT_VERSION = 2


def cache_path(cache_dir: str, source: str, split: str) -> str:
  """``<cache_dir>/<source name>-<hash of its real path>-<split>.npz``."""
  stem = os.path.basename(os.path.normpath(source))
  for suffix in (".tar.gz", ".tgz", ".tar"):
    if stem.endswith(suffix):
      stem = stem[:-len(suffix)]
  key = hashlib.sha1(os.path.realpath(source).encode()).hexdigest()[:10]
  return os.path.join(cache_dir, f"{stem}-{key}-{split}.npz")


def _read_cache(path: str, fingerprint: str, split: str, source: str,
                expected_counts: Optional[ExpectedCounts]) -> Optional[LabelledImages]:
  """The cached split if the file exists and passes validation, else None (with a log line)."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      if int(z["format_version"]) != CACHE_FORMAT_VERSION:
        raise ValueError(f"format version {int(z['format_version'])}")
      if str(z["fingerprint"]) != fingerprint:
        raise ValueError("the source changed since the cache was written")
      data = LabelledImages(z["images"], z["labels"], tuple(str(c) for c in z["class_names"]),
                            tuple(str(i) for i in z["ids"]))
      stored_counts = z["class_counts"]
    check_split(data, split, source, expected_counts)
    if not np.array_equal(stored_counts, np.bincount(data.labels,
                                                     minlength=len(data.class_names))):
      raise ValueError("class counts differ from the stored ones")
    if len(data.ids) != len(data.labels):
      raise ValueError("the number of example ids differs from the number of images")
    return data
  except Exception as e:  # pylint: disable=broad-except  # any unreadable cache is rebuilt
    logging.warning("Rebuilding the cache %s: it failed validation (%s: %s).", path,
                    type(e).__name__, e)
    return None


def _write_cache(path: str, data: LabelledImages, fingerprint: str) -> None:
  """Writes ``path`` atomically (``atomic.write_atomic``)."""
  atomic.write_atomic(path, lambda fh: np.savez(
      fh, images=data.images, labels=data.labels,
      class_names=np.array(data.class_names, dtype=np.str_),
      ids=np.array(data.ids, dtype=np.str_),
      class_counts=np.bincount(data.labels, minlength=len(data.class_names)),
      fingerprint=np.array(fingerprint), format_version=np.array(CACHE_FORMAT_VERSION)),
                         binary=True)


def _decode_splits(root: str, splits: Sequence[str], origin: str, path: str,
                   progress: bool, listed: Optional[dict] = None) -> dict[str, LabelledImages]:
  """``splits`` of the folder ``root`` decoded through ``sources.FileSource``; one error
  names every bad image of them all. ``listed``: ``{split: split_files listing}`` already
  made."""
  bad, decoded = image_folder.BadImages(), {}
  for split in splits:
    src = sources.FileSource.from_folder(root, split, origin=origin,
                                         files=(listed or {}).get(split))
    out = sources.decode_all(src, split, bad, progress)
    if out is not None:
      decoded[split] = LabelledImages(out[0], out[1], src.class_names, tuple(out[2]))
  bad.raise_if_any(f"archive {path}" if origin else os.path.abspath(path))
  return decoded


def load_image_folder_splits(path: str, splits: Sequence[str] = ("train", "test"), *,
                             cache_dir: Optional[str] = None,
                             expected_counts: Optional[ExpectedCounts] = None,
                             progress: bool = True) -> dict[str, LabelledImages]:
  """Several splits of an image folder or archive, decoded into memory.

  Args:
    path: directory or ``.tar[.gz]`` archive holding ``<split>/<class>/<image>``.
    splits: split folder names, e.g. ``('train', 'test')``.
    cache_dir: where decoded splits are cached as ``.npz`` (and an archive is extracted
      while it is read); None = no cache (the system's temporary folder).
    expected_counts: per split, a total or ``{class: count}`` to verify.
    progress: show progress bars while extracting and decoding.

  Returns:
    ``{split: LabelledImages}`` with images ``[N, H, W, 3]`` uint8, labels ``[N]`` int32
    (sorted class-folder order), class names and example ids (``<split>/<class>/<file>``).
    All splits must have the same classes.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: missing split, empty class folder, undecodable image (the message names
      every such file), mixed image sizes, classes that differ between splits, or counts
      that differ from ``expected_counts``.
  """
  splits = tuple(splits)
  if not splits or len(set(splits)) != len(splits):
    raise ValueError(f"splits must be non-empty and distinct, got {splits}.")
  image_folder.check_source(path)
  archive = os.path.isfile(path)
  out: dict[str, LabelledImages] = {}
  fingerprints, listed = {}, {}
  for split in splits:
    if archive:
      fingerprints[split] = image_folder.archive_fingerprint(path)
    else:
      listed[split] = image_folder.split_files(path, split)
      fingerprints[split] = image_folder.directory_fingerprint(listed[split])
    if cache_dir:
      cached = _read_cache(cache_path(cache_dir, path, split), fingerprints[split], split, path,
                           expected_counts)
      if cached is not None:
        logging.info("Loaded %s split %r from cache (%d images).", path, split, len(cached))
        out[split] = cached

  todo = [s for s in splits if s not in out]
  if todo and archive:
    with sources.extracted(path, cache_dir, progress, todo) as root:
      decoded = _decode_splits(root, todo, path, path, progress)
  elif todo:
    decoded = _decode_splits(path, todo, "", path, progress, listed)
  for split in todo:
    check_split(decoded[split], split, path, expected_counts)
    out[split] = decoded[split]

  names = {s: out[s].class_names for s in splits}
  if len(set(names.values())) != 1:
    raise ValueError(f"Splits of {path} have different classes: {names}.")
  if cache_dir:  # only now: a load that fails any check writes nothing
    for split in todo:
      _write_cache(cache_path(cache_dir, path, split), out[split], fingerprints[split])
  return {s: out[s] for s in splits}


def load_image_folder(path: str, split: str, *, cache_dir: Optional[str] = None,
                      expected_counts: Optional[ExpectedCounts] = None,
                      progress: bool = True) -> LabelledImages:
  """One split of an image folder or archive; see ``load_image_folder_splits``."""
  return load_image_folder_splits(path, (split,), cache_dir=cache_dir,
                                  expected_counts=expected_counts, progress=progress)[split]


def load_tfds_splits(name: str, data_dir: str, splits: Sequence[str] = ("train", "test"),
                     progress: bool = True) -> dict[str, LabelledImages]:
  """Small prepared TFDS datasets (CIFAR-10) decoded into memory through
  ``sources.TfdsSource``: ``{split: LabelledImages}`` with images ``[N, H, W, 3]`` uint8,
  labels ``[N]`` int32 and each record's ``id``/``file_name`` as ids. ImageNet (1.28M
  images of varied sizes) is streamed instead (``config.data.in_memory=False``)."""
  if name == "imagenet2012":
    raise ValueError("imagenet2012 is too large (and its images vary in size) to load into "
                     "memory; stream it (config.data.in_memory=False).")
  out = {}
  for split in splits:
    src = sources.TfdsSource(name, split, data_dir)
    held = sources.cache(src, split, progress)
    out[split] = LabelledImages(held.images, held.labels, held.class_names, tuple(held.ids))
  return out
