"""Image-folder datasets: ``<split>/<class>/*.(jpg|jpeg|png)`` in a directory or a tar archive.

The rules every reader of an image folder follows (``sources.FileSource`` reads the
files, ``sources.extract_archive`` unpacks an archive, ``in_memory`` decodes a whole
folder): the source is a directory or a ``.tar`` / ``.tar.gz`` archive holding that tree
(optionally under one top folder); labels follow the sorted class-folder names (for
CIFAR-10 that is the usual label order, airplane … truck); files are read in sorted
order; images are decoded with PIL and converted to RGB; every undecodable (or empty)
image of a load is listed in one error, up to ``MAX_LISTED_BAD_FILES``. Also here: the
cheap pre-pass over image files (``image_file_problem``), the fingerprints of a folder
and of an archive, and the checks of a decoded split (``check_split``).
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from PIL import Image

from overinterp_jax.data.labelled import LabelledImages
from overinterp_jax.progress import progress_bar

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR10_EXPECTED_COUNTS = {"train": {c: 5000 for c in CIFAR10_CLASSES},
                           "test": {c: 1000 for c in CIFAR10_CLASSES}}
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


class BadImages:
  """The failures of a load, noted instead of stopping at the first; ``raise_if_any``
  then names them all (up to ``MAX_LISTED_BAD_FILES``)."""

  def __init__(self):
    self.errors: list[str] = []

  def note(self, error: ValueError) -> None:
    self.errors.append(str(error))

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


def split_files(path: str, split: str, origin: str = "") -> dict[str, list[str]]:
  """``{class: [image paths, sorted]}`` of ``path/split``; errors for a missing split/empty class.
  ``origin``: the archive ``path`` was extracted from, named in errors instead of ``path``."""
  split_dir = os.path.join(path, split)
  shown = (lambda sub: f"{origin}:{sub}") if origin else (lambda sub: os.path.join(path, sub))
  if not os.path.isdir(split_dir):
    found = sorted(d for d in os.listdir(path)
                   if os.path.isdir(os.path.join(path, d)) and not d.startswith("."))
    where = f"archive {origin}" if origin else path
    raise ValueError(f"Split {split!r} not found in {where}: no folder {shown(split)}; "
                     f"folders there: {found}.")
  classes = sorted(d for d in os.listdir(split_dir)
                   if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith("."))
  if not classes:
    raise ValueError(f"No class folders in {shown(split)}.")
  files = {}
  for c in classes:
    class_dir = os.path.join(split_dir, c)
    names = sorted(n for n in os.listdir(class_dir) if is_image_name(n))
    if not names:
      raise ValueError(f"Class folder {shown(split + '/' + c)} has no images "
                       f"({'|'.join(IMAGE_EXTENSIONS)}).")
    files[c] = [os.path.join(class_dir, n) for n in names]
  return files


def directory_fingerprint(files: Mapping[str, Sequence[str]]) -> str:
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
