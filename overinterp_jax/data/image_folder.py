"""Image-folder datasets: ``<split>/<class>/*.(jpg|jpeg|png)`` from a directory or a tar archive.

The source is a directory or a ``.tar`` / ``.tar.gz`` archive holding that tree
(optionally under one top folder). Archives are streamed with ``tarfile`` and
decoded with PIL in memory; nothing is extracted to disk. Labels follow the
sorted class-folder names (for CIFAR-10 that is the usual label order,
airplane … truck). Images are converted to RGB and must all have the same size.
Every undecodable (or empty) image of a load is listed in one error, up to
``MAX_LISTED_BAD_FILES``.

Decoding 60k JPEGs takes a while, so each split is decoded once and cached as
``<cache_dir>/<source name>-<hash of its path>-<split>.npz`` (uint8 images,
int32 labels, class names, a fingerprint of the source), written atomically
(``atomic.write_atomic``) and only once every requested split has passed
its checks, so a load that fails writes nothing. A cache file is used only if
it passes validation (readable, consistent shapes and dtypes, counts, classes,
the source's fingerprint, ``expected_counts``); otherwise it is rebuilt.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zlib
from typing import Iterator, Mapping, Optional, Sequence, Union

import numpy as np
from absl import logging
from PIL import Image

from overinterp_jax.data.labelled import LabelledImages
from overinterp_jax.progress import progress_bar
from overinterp_jax.store import atomic

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR10_EXPECTED_COUNTS = {"train": {c: 5000 for c in CIFAR10_CLASSES},
                           "test": {c: 1000 for c in CIFAR10_CLASSES}}
CACHE_FORMAT_VERSION = 1
MAX_LISTED_BAD_FILES = 20

# Per split: an int (total images) or {class name: count}.
ExpectedCounts = Mapping[str, Union[int, Mapping[str, int]]]


def is_image_name(name: str) -> bool:
  """Whether ``name`` (a file or archive member) is an image file: not hidden, an
  ``IMAGE_EXTENSIONS`` suffix (any case)."""
  base = os.path.basename(name)
  return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


def to_rgb(img: Image.Image) -> np.ndarray:
  """A PIL image of any mode (L, LA, P, CMYK, RGBA, I;16...) as ``[H, W, 3]`` uint8 RGB."""
  if img.mode == "RGB":
    return np.asarray(img, np.uint8)
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits
    a = np.asarray(img, np.float64)
    top = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
    return np.repeat((np.clip(a / top, 0, 1) * 255 + 0.5).astype(np.uint8)[..., None], 3, -1)
  return np.asarray(img.convert("RGB"), np.uint8)


def decode_image(data: bytes, where: str) -> np.ndarray:
  """Decodes one JPEG/PNG (any mode) to ``[H, W, 3]`` uint8 RGB; ValueError naming
  ``where`` if it fails."""
  if not data:
    raise ValueError(f"Cannot decode image {where}: the file is empty (0 bytes).")
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      return to_rgb(img)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"Cannot decode image {where}: {e}") from e


class _Decoder:
  """Decodes images one by one, noting the failures instead of stopping at the first;
  ``raise_if_any`` then names them all (up to ``MAX_LISTED_BAD_FILES``)."""

  def __init__(self):
    self.errors: list[str] = []

  def __call__(self, data: bytes, where: str) -> Optional[np.ndarray]:
    try:
      return decode_image(data, where)
    except ValueError as e:
      self.errors.append(str(e))
      return None

  def raise_if_any(self, source: str) -> None:
    if not self.errors:
      return
    listed = self.errors[:MAX_LISTED_BAD_FILES]
    more = len(self.errors) - len(listed)
    raise ValueError(f"{len(self.errors)} image(s) of {source} cannot be decoded:\n  "
                     + "\n  ".join(listed) + (f"\n  ... and {more} more." if more else ""))


# Bytes at the end of a file searched for its format's end marker (a JPEG's FF D9, a PNG's
# IEND chunk); a file that lacks it is decoded in full to tell a truncated file from one
# with trailing data.
END_MARKER_WINDOW = 1024
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}


def image_file_problem(path: str) -> Optional[str]:
  """Why the image file ``path`` cannot be used, or None: from its size and headers, a
  cheap check that needs no decoding for a sound file (``config.runtime.bad_files``).

  A file is bad when it is empty, when PIL cannot parse its header (not an image, a
  corrupt header), or when it decodes with an error; it is decoded in full only when its
  format's end marker is missing from its last ``END_MARKER_WINDOW`` bytes (JPEG, PNG:
  truncated files lack it). Damage inside a sound file's compressed data is found only
  when it is decoded for a batch.
  """
  try:
    size = os.path.getsize(path)
    if size == 0:
      return "the file is empty (0 bytes)"
    with open(path, "rb") as fh, Image.open(fh) as img:
      marker = _END_MARKERS.get(img.format)
      fh.seek(max(0, size - END_MARKER_WINDOW))
      if marker is None or marker not in fh.read():
        fh.seek(0)
        img.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    return f"{type(e).__name__}: {e}"
  return None


def find_bad_files(paths: Sequence[str], progress: bool = True, desc: str = "checking images"
                   ) -> list[tuple[str, str]]:
  """``[(path, problem)]`` of the ``paths`` that ``image_file_problem`` rejects, in the order
  of ``paths``; the files are read by a pool of threads (the check waits on the disk)."""
  from concurrent import futures  # pylint: disable=import-outside-toplevel
  workers = min(32, 4 * (os.cpu_count() or 1))
  with futures.ThreadPoolExecutor(workers) as pool:
    problems = list(progress_bar(pool.map(image_file_problem, paths, chunksize=64),
                                 total=len(paths), desc=desc, unit="img", show=progress))
  return [(p, why) for p, why in zip(paths, problems) if why is not None]


def _is_archive(path: str) -> bool:
  return os.path.isfile(path)


def check_source(path: str) -> None:
  """FileNotFoundError if ``path`` is missing; ValueError if it is a file but no tar archive."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"Image folder or archive not found: {path}")
  if os.path.isfile(path) and not tarfile.is_tarfile(path):
    raise ValueError(f"{path} is a file but not a tar archive (.tar, .tar.gz); expected an "
                     "image-folder directory or an archive of one.")


# ----------------------------------------------------------------------------- listing and reading


def split_files(path: str, split: str) -> dict[str, list[str]]:
  """``{class: [image paths, sorted]}`` of ``path/split``; errors for a missing split/empty class."""
  split_dir = os.path.join(path, split)
  if not os.path.isdir(split_dir):
    found = sorted(d for d in os.listdir(path)
                   if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    raise ValueError(f"Split {split!r} not found in {path}: no folder {split_dir}; "
                     f"folders there: {found}.")
  classes = sorted(d for d in os.listdir(split_dir)
                   if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith("."))
  if not classes:
    raise ValueError(f"No class folders in {split_dir}.")
  files = {}
  for c in classes:
    class_dir = os.path.join(split_dir, c)
    names = sorted(n for n in os.listdir(class_dir) if is_image_name(n))
    if not names:
      raise ValueError(f"Class folder {class_dir} has no images ({'|'.join(IMAGE_EXTENSIONS)}).")
    files[c] = [os.path.join(class_dir, n) for n in names]
  return files


def _directory_fingerprint(files: Mapping[str, Sequence[str]]) -> str:
  h = hashlib.sha1()
  for c in sorted(files):
    for f in files[c]:
      st = os.stat(f)
      h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  return h.hexdigest()


def archive_fingerprint(path: str) -> str:
  """What identifies the archive file ``path`` (40 hex digits): its real path, size and
  modification time. The one rule of both data paths: the decoded-array cache stores it,
  the extracted folder of streamed data is named by its first 16 digits."""
  st = os.stat(path)
  return hashlib.sha1(f"{os.path.realpath(path)}\0{st.st_size}\0{st.st_mtime_ns}".encode()
                      ).hexdigest()


def _split_class_of(member_name: str) -> Optional[tuple[str, str]]:
  """``(split, class)`` of an archive member ``[top/]split/class/file``, else None."""
  parts = [p for p in member_name.split("/") if p not in ("", ".")]
  if len(parts) < 3:
    return None
  return parts[-3], parts[-2]


def _iter_archive(path: str, splits: Sequence[str], progress: bool, total: Optional[int]
                  ) -> Iterator[tuple[str, str, str, bytes]]:
  """Streams ``(split, class, member name, encoded image bytes)`` for ``splits``.

  Also checks, once the stream ends, that every requested split was present and
  that no class folder of those splits was empty.
  """
  seen_splits: set[str] = set()
  class_dirs: dict[str, set[str]] = {s: set() for s in splits}
  class_files: dict[str, set[str]] = {s: set() for s in splits}
  bar = progress_bar(total=total, desc=f"decoding {os.path.basename(path)} {'+'.join(splits)}",
                     unit="img", show=progress)
  try:
    with tarfile.open(path, mode="r|*") as archive:
      for member in archive:
        parts = [p for p in member.name.split("/") if p not in ("", ".")]
        if member.isdir():
          if len(parts) >= 2 and parts[-2] in class_dirs and not parts[-1].startswith("."):
            class_dirs[parts[-2]].add(parts[-1])
          continue
        if not member.isfile() or not is_image_name(member.name):
          continue
        split_class = _split_class_of(member.name)
        if split_class is None:
          continue
        split, cls = split_class
        seen_splits.add(split)
        if split not in class_files:
          continue
        class_files[split].add(cls)
        fh = archive.extractfile(member)
        yield split, cls, member.name, fh.read() if fh is not None else b""
        bar.update()
  except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
    raise ValueError(f"Cannot read archive {path}: {e}") from e
  finally:
    bar.close()
  for split in splits:
    if not class_files[split]:
      raise ValueError(f"Split {split!r} not found in archive {path} (no "
                       f"{split}/<class>/<image> members); splits found: {sorted(seen_splits)}.")
    empty = sorted(class_dirs[split] - class_files[split])
    if empty:
      raise ValueError(f"Class folder(s) {[f'{split}/{c}' for c in empty]} in archive {path} "
                       "have no images.")


def _stack(split: str, items: list[tuple[str, str, np.ndarray]]) -> LabelledImages:
  """Sorts ``(class, name, image)`` by class then name and stacks them; checks sizes agree."""
  items.sort(key=lambda t: (t[0], t[1]))
  class_names = tuple(sorted({c for c, _, _ in items}))
  shape = items[0][2].shape
  for c, name, img in items:
    if img.shape != shape:
      raise ValueError(f"Image {name} of split {split!r} has shape {img.shape}, but "
                       f"{items[0][1]} has {shape}; all images must have the same size.")
  index = {c: i for i, c in enumerate(class_names)}
  images = np.stack([img for _, _, img in items])
  labels = np.array([index[c] for c, _, _ in items], np.int32)
  return LabelledImages(images, labels, class_names)


def _decode_directory(path: str, split: str, files: Mapping[str, Sequence[str]],
                      progress: bool) -> LabelledImages:
  items = []
  decode = _Decoder()
  total = sum(len(v) for v in files.values())
  with progress_bar(total=total, desc=f"decoding {split}", unit="img", show=progress) as bar:
    for c, names in files.items():
      for f in names:
        with open(f, "rb") as fh:
          items.append((c, f, decode(fh.read(), f)))
        bar.update()
  decode.raise_if_any(os.path.join(path, split))
  return _stack(split, items)


# ----------------------------------------------------------------------------- checks and cache


def check_split(data: LabelledImages, split: str, source: str,
                expected_counts: Optional[ExpectedCounts] = None) -> None:
  """Raises ValueError unless ``data`` is a consistent, non-empty split of ``source``.

  Checks dtypes and shapes (``[N, H, W, 3]`` uint8, ``[N]`` int32), labels in
  range, every class present, and ``expected_counts[split]`` if given (a total
  or ``{class: count}``).
  """
  images, labels, names = data.images, data.labels, data.class_names
  where = f"split {split!r} of {source}"
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"{where}: images must be [N, H, W, 3] uint8, got {images.shape} "
                     f"{images.dtype}.")
  if labels.dtype != np.int32 or labels.shape != (images.shape[0],):
    raise ValueError(f"{where}: labels must be [{images.shape[0]}] int32, got {labels.shape} "
                     f"{labels.dtype}.")
  if len(labels) == 0 or not names:
    raise ValueError(f"{where} is empty.")
  if labels.min() < 0 or labels.max() >= len(names):
    raise ValueError(f"{where}: labels outside [0, {len(names)}).")
  counts = data.class_counts()
  empty = [c for c, n in counts.items() if n == 0]
  if empty:
    raise ValueError(f"{where}: classes {empty} have no images.")
  if expected_counts is not None and split in expected_counts:
    expected = expected_counts[split]
    if isinstance(expected, int):
      if len(labels) != expected:
        raise ValueError(f"{where} has {len(labels)} images, expected {expected}.")
    elif dict(expected) != counts:
      raise ValueError(f"{where} has per-class counts {counts}, expected {dict(expected)}.")


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
      data = LabelledImages(z["images"], z["labels"], tuple(str(c) for c in z["class_names"]))
      stored_counts = z["class_counts"]
    check_split(data, split, source, expected_counts)
    if not np.array_equal(stored_counts, np.bincount(data.labels,
                                                     minlength=len(data.class_names))):
      raise ValueError("class counts differ from the stored ones")
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
      class_counts=np.bincount(data.labels, minlength=len(data.class_names)),
      fingerprint=np.array(fingerprint), format_version=np.array(CACHE_FORMAT_VERSION)),
                         binary=True)


# ----------------------------------------------------------------------------- entry points


def load_image_folder_splits(path: str, splits: Sequence[str] = ("train", "test"), *,
                             cache_dir: Optional[str] = None,
                             expected_counts: Optional[ExpectedCounts] = None,
                             progress: bool = True) -> dict[str, LabelledImages]:
  """Loads several splits of an image folder or archive (an archive is read in one pass).

  Args:
    path: directory or ``.tar[.gz]`` archive holding ``<split>/<class>/<image>``.
    splits: split folder names, e.g. ``('train', 'test')``.
    cache_dir: where decoded splits are cached as ``.npz``; None = no cache.
    expected_counts: per split, a total or ``{class: count}`` to verify.
    progress: show a tqdm bar while decoding.

  Returns:
    ``{split: LabelledImages}`` with images ``[N, H, W, 3]`` uint8, labels
    ``[N]`` int32 (sorted class-folder order), class names. All splits must
    have the same classes.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: missing split, empty class folder, undecodable image (the
      message names the file), mixed image sizes, classes that differ between
      splits, or counts that differ from ``expected_counts``.
  """
  splits = tuple(splits)
  if not splits or len(set(splits)) != len(splits):
    raise ValueError(f"splits must be non-empty and distinct, got {splits}.")
  check_source(path)
  archive = _is_archive(path)
  out: dict[str, LabelledImages] = {}
  dir_files = {}
  fingerprints = {}
  for split in splits:
    if archive:
      fingerprints[split] = archive_fingerprint(path)
    else:
      dir_files[split] = split_files(path, split)
      fingerprints[split] = _directory_fingerprint(dir_files[split])
    if cache_dir:
      cached = _read_cache(cache_path(cache_dir, path, split), fingerprints[split], split, path,
                           expected_counts)
      if cached is not None:
        logging.info("Loaded %s split %r from cache (%d images).", path, split, len(cached))
        out[split] = cached

  todo = [s for s in splits if s not in out]
  if todo:
    if archive:
      total = None
      if expected_counts and all(s in expected_counts for s in todo):
        total = sum(v if isinstance(v, int) else sum(v.values())
                    for v in (expected_counts[s] for s in todo))
      items = {s: [] for s in todo}
      decode = _Decoder()
      for split, cls, name, data in _iter_archive(path, todo, progress, total):
        items[split].append((cls, name, decode(data, f"{path}:{name}")))
      decode.raise_if_any(f"archive {path}")
      decoded = {s: _stack(s, items[s]) for s in todo}
    else:
      decoded = {s: _decode_directory(path, s, dir_files[s], progress) for s in todo}
    for split, data in decoded.items():
      check_split(data, split, path, expected_counts)
      out[split] = data

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
