"""Random-access image sources behind one protocol (``Source``), decoded lazily.

Every source is one split of labelled images: ``len(source)`` examples,
``source.class_names``, ``source.labels`` (``[N]`` int32), ``source.example_id(i)``
(a stable key: the file's path relative to the dataset root, TFDS's ``file_name``
or ``id``, or ``"<split>/<index>"`` for arrays without ids), ``source[i] -> (image
[H, W, 3] uint8, label int)``, ``source.gather(indices)`` (a batch of same-size
images) and ``source.image_shape`` (``(H, W, 3)`` when every image has it, else None).
Sources are picklable, so grain's worker processes can read them.

  * ``ArraySource``: images held in memory (CIFAR-sized data, synthetic data, the
    shipped slice; ``cache(source)`` of any source); ``gather(indices)`` reads a whole
    batch with one fancy index, the fast path the loader uses.
  * ``FileSource``: an image folder ``<root>/<split>/<class>/<image>`` read as
    a list of files; each image is decoded (PIL, converted to RGB from grey,
    CMYK, palette or RGBA) only when asked for. ``.tar``/``.tar.gz`` archives
    are extracted once into a cache folder (streamed, written atomically) and
    then read the same way: a gzip stream has no random access.
  * ``TfdsSource``: a split prepared by TFDS as ArrayRecord files, through
    ``tfds.data_source`` (never downloading); JPEG bytes decoded here.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
import zlib
from typing import Iterator, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from overinterp_jax.data import image_folder, tfds_source
from overinterp_jax.progress import progress_bar

IMAGE_EXTENSIONS = image_folder.IMAGE_EXTENSIONS


@runtime_checkable
class Source(Protocol):
  """One split of labelled images with random access (see the module docstring)."""
  class_names: tuple[str, ...]
  image_shape: Optional[tuple[int, int, int]]

  @property
  def labels(self) -> np.ndarray:
    """``[N]`` int32."""

  def __len__(self) -> int:
    """``N``, the number of examples."""

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    """``(image [H, W, 3] uint8, label)`` of example ``i``."""

  def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[b, H, W, 3]`` uint8 and labels ``[b]`` int32 of ``indices``."""

  def example_id(self, i: int) -> str:
    """The stable key of example ``i``."""


class _ReadsOneByOne:
  """``gather`` of a source that decodes one example at a time."""

  def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[b, H, W, 3]`` uint8 and labels ``[b]`` int32 of ``indices`` (the images must
    share a size)."""
    examples = [self[int(i)] for i in np.asarray(indices, np.int64)]
    if not examples:
      return np.zeros((0,) + tuple(self.image_shape or (0, 0, 3)), np.uint8), np.zeros(0, np.int32)
    return np.stack([im for im, _ in examples]), np.array([y for _, y in examples], np.int32)


def cache(source: Source, split: str = "data", progress: bool = False) -> "ArraySource":
  """Every example of ``source`` (images of one size) decoded into memory, as an
  ``ArraySource`` with its ids; ValueError naming every image that cannot be decoded."""
  bad = image_folder.BadImages()
  decoded = decode_all(source, split, bad, progress)
  bad.raise_if_any(f"split {split!r}")
  images, labels, ids = decoded
  return ArraySource(images, labels, source.class_names, split, ids)


class ArraySource:
  """In-memory images ``[N, H, W, C]`` uint8 and labels ``[N]`` int32; ``ids``: ``[N]``
  example ids (e.g. TFDS's ``id``), None = ``"<split>/<index>"``."""
  in_memory = True

  def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
               split: str = "data", ids: Optional[Sequence[str]] = None):
    if images.ndim != 4 or len(images) != len(labels):
      raise ValueError(f"ArraySource needs images [N, H, W, C] and labels [N], got "
                       f"{images.shape} and {np.shape(labels)}.")
    self.images, self.labels = images, np.asarray(labels, np.int32)
    self.class_names, self.split = tuple(class_names), split
    if ids is not None and len(ids) != len(self.labels):
      raise ValueError(f"ArraySource: {len(ids)} ids for {len(self.labels)} images.")
    self.ids = ids

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    return self.images[i], int(self.labels[i])

  def gather(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images ``[b, H, W, C]`` and labels ``[b]`` of ``indices`` in one read."""
    return self.images[indices], self.labels[indices]

  def example_id(self, i: int) -> str:
    return f"{self.split}/{int(i)}" if self.ids is None else str(self.ids[int(i)])

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.images.shape[1:])


class FileSource(_ReadsOneByOne):
  """Image files, decoded lazily. ``paths[i]`` has label ``labels[i]``; ``origin``: the
  archive the files were extracted from ("" = none), named in errors instead of the
  extracted copy."""

  def __init__(self, root: str, paths: Sequence[str], labels: Sequence[int],
               class_names: Sequence[str], image_shape: Optional[tuple] = None,
               origin: str = ""):
    self.root, self.paths = root, list(paths)
    self.labels = np.asarray(labels, np.int32)
    self.class_names, self.image_shape = tuple(class_names), image_shape
    self.origin = origin

  @classmethod
  def from_folder(cls, root: str, split: str, image_shape: Optional[tuple] = None,
                  origin: str = "", files: Optional[dict] = None) -> "FileSource":
    """``root/split/<class>/<image>``, classes sorted by name (= label order), files sorted.
    ``files``: that split's listing when the caller has it (``image_folder.split_files``)."""
    files = image_folder.split_files(root, split, origin) if files is None else files
    classes = tuple(sorted(files))
    paths = [p for c in classes for p in files[c]]
    labels = [i for i, c in enumerate(classes) for _ in files[c]]
    return cls(root, paths, labels, classes, image_shape, origin)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    path = self.paths[i]
    where = f"{self.origin}:{self.example_id(i)}" if self.origin else path
    with open(path, "rb") as fh:
      return image_folder.decode_image(fh.read(), where), int(self.labels[i])

  def example_id(self, i: int) -> str:
    return os.path.relpath(self.paths[i], self.root)


def _extract_into(path: str, dest: str, progress: bool,
                  splits: Optional[Sequence[str]] = None) -> None:
  """The image members of tar archive ``path`` written to ``dest`` as
  ``<split>/<class>/<image>`` (any top folder dropped), and its class folders that hold
  no image created empty (so a listing finds them and names them). ``splits``: only
  these split folders (None = all)."""
  class_dirs, skipped = set(), set()  # skipped: split folders left empty (still listed)
  try:
    with tarfile.open(path, mode="r|*") as archive:
      for member in progress_bar(archive, desc=f"extracting {os.path.basename(path)}",
                                 unit="file", show=progress):
        parts = [p for p in member.name.split("/") if p not in ("", ".")]
        if ".." in parts:
          continue
        if member.isdir() and len(parts) >= 2 and not parts[-1].startswith("."):
          class_dirs.add(tuple(parts[-2:]))
        if not member.isfile() or len(parts) < 3 or not image_folder.is_image_name(member.name):
          continue
        if splits is not None and parts[-3] not in splits:
          skipped.add(parts[-3])
          continue
        out = os.path.join(dest, *parts[-3:])
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with archive.extractfile(member) as src, open(out, "wb") as dst:
          shutil.copyfileobj(src, dst)
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    raise ValueError(f"Cannot read archive {path}: {e}") from e
  for split in skipped:
    os.makedirs(os.path.join(dest, split), exist_ok=True)
  for split, cls in class_dirs:  # a folder <split>/<class> under a split that has images
    if os.path.isdir(os.path.join(dest, split)) and (splits is None or split in splits):
      os.makedirs(os.path.join(dest, split, cls), exist_ok=True)


def extract_archive(path: str, cache_dir: str, progress: bool = True) -> str:
  """The image members of tar archive ``path`` extracted under ``cache_dir``; returns the
  folder holding ``<split>/<class>/<image>``.

  Streamed member by member (nothing held in memory); written to a temporary folder
  renamed into place when complete, so a killed extraction is redone, never half-used.
  A folder is reused only if the archive's path, size and modification time match.
  Members are stored as ``<split>/<class>/<image>`` whatever top folder they had.
  """
  image_folder.check_source(path)
  target = os.path.join(cache_dir, f"{os.path.basename(path).split('.')[0]}-"
                                    f"{image_folder.archive_fingerprint(path)[:16]}")
  if os.path.isdir(target):
    return target
  tmp = f"{target}.tmp{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    _extract_into(path, tmp, progress)
  except ValueError:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  os.replace(tmp, target)
  return target


@contextlib.contextmanager
def extracted(path: str, parent: Optional[str] = None, progress: bool = True,
              splits: Optional[Sequence[str]] = None) -> Iterator[str]:
  """The ``splits`` (None = all) of tar archive ``path`` extracted into a temporary folder
  under ``parent`` (None = the system's), removed when the block ends: for reading an
  archive once."""
  image_folder.check_source(path)
  created = None  # the topmost folder of parent's that this call creates (removed after)
  if parent:
    parent = os.path.abspath(parent)
    d = parent
    while not os.path.exists(d):
      created, d = d, os.path.dirname(d)
    os.makedirs(parent, exist_ok=True)
  try:
    with tempfile.TemporaryDirectory(dir=parent or None, prefix="extracting-") as tmp:
      _extract_into(path, tmp, progress, splits)
      yield tmp
  finally:
    d = parent
    while created is not None and not os.listdir(d):  # a failed load leaves no folder
      os.rmdir(d)
      if d == created:
        break
      d = os.path.dirname(d)


def folder_source(path: str, split: str, cache_dir: str, progress: bool = True,
                  image_shape: Optional[tuple] = None) -> FileSource:
  """A ``FileSource`` of ``split`` of an image folder or tar archive at ``path`` (an
  archive is extracted once into ``cache_dir``)."""
  image_folder.check_source(path)
  if os.path.isfile(path):
    return FileSource.from_folder(extract_archive(path, cache_dir, progress), split,
                                  image_shape, origin=path)
  return FileSource.from_folder(path, split, image_shape)


def decode_all(source: Source, split: str, bad: image_folder.BadImages,
               progress: bool = True) -> Optional[tuple[np.ndarray, np.ndarray, list[str]]]:
  """Every example of ``source`` decoded: images ``[N, H, W, 3]`` uint8, labels ``[N]``
  int32 and example ids; None when an image cannot be decoded (noted in ``bad``, so one
  error can name every bad image of several splits). ValueError when images differ in
  size."""
  images, labels, failed = [], [], False
  for i in progress_bar(range(len(source)), desc=f"decoding {split}", unit="img",
                        show=progress):
    try:
      image, label = source[i]
      images.append(image)
      labels.append(label)
    except ValueError as e:
      bad.note(e)
      failed = True
  if failed:
    return None
  ids = [source.example_id(i) for i in range(len(source))]
  for i, image in enumerate(images):
    if image.shape != images[0].shape:
      raise ValueError(f"Image {ids[i]} of split {split!r} has shape {image.shape}, but "
                       f"{ids[0]} has {images[0].shape}; all images must have the same size.")
  stacked = (np.stack(images) if images
             else np.zeros((0,) + tuple(source.image_shape or (0, 0, 3)), np.uint8))
  return stacked, np.asarray(labels, np.int32), ids


class TfdsSource(_ReadsOneByOne):
  """A TFDS split prepared as ArrayRecord, read with ``tfds.data_source``; the image bytes
  are decoded here (TFDS's own decoder would need TensorFlow). Opened lazily, so the
  source pickles as its name, split and folder."""

  def __init__(self, name: str, split: str, data_dir: str,
               image_shape: Optional[tuple] = None):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.class_names = tfds_source.class_names(name, data_dir)
    self.image_shape = image_shape
    self._source = None
    self._length = len(self._open())

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
      tfds_source._check_prepared(self.name, self.data_dir)  # pylint: disable=protected-access
      try:
        self._source = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                                        download=False,
                                        decoders={"image": tfds.decode.SkipDecoding()})
      except Exception as e:  # pylint: disable=broad-except  # TFDS raises many kinds here
        raise FileNotFoundError(
            f"Cannot open TFDS {self.name!r} split {self.split!r} in {self.data_dir!r}: "
            f"{type(e).__name__}: {e}. It must be prepared there as array_record (docs/data.md)."
        ) from e
    return self._source

  def __getstate__(self):
    return {**self.__dict__, "_source": None}

  def __len__(self) -> int:
    return self._length

  @property
  def labels(self) -> np.ndarray:
    """``[N]`` int32, read once from every record (a pass over the split's files)."""
    if getattr(self, "_labels", None) is None:
      self._labels = np.array([int(self._example(i)["label"]) for i in range(len(self))],
                              np.int32)
    return self._labels

  def _example(self, i: int) -> dict:
    return self._open()[int(i)]

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    ex = self._example(i)
    image = ex["image"]
    if isinstance(image, (bytes, np.bytes_)):
      image = image_folder.decode_image(bytes(image), f"{self.name}/{self.split}[{i}]")
    elif image.shape[-1] == 1:
      image = np.repeat(image, 3, -1)
    return np.asarray(image, np.uint8), int(ex["label"])

  def example_id(self, i: int) -> str:
    """The record's ``file_name`` (ImageNet) or ``id`` (CIFAR-10), else ``split/i``."""
    key = tfds_source.example_key(self._example(i))
    return f"{self.split}/{int(i)}" if key is None else key
