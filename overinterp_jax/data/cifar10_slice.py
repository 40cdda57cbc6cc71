"""The CIFAR-10 slice shipped in the package: 1,000 real test images, 100 per class.

``slices/cifar10_test_1000.tar.gz`` holds ``test/<class>/<NNNN>.jpg``: the first
100 files (by name) of each class folder of the test split of our CIFAR-10 JPEG
archive (JPEG quality 75 re-encodings of the original 32×32 pixels), bytes
unchanged. It is what an image-folder config loads when ``config.data.path`` is
empty, so the quick start and the notebook run on a fresh clone with nothing
downloaded. It has no train images: analysing a trained model needs only test
images, training needs the full dataset (``docs/data.md``).

Rebuild it (byte-identical: sorted members, fixed times and owners) with
``python -m overinterp_jax.data.cifar10_slice --archive=cifar10_jpeg.tar.gz``.
"""
from __future__ import annotations

import argparse
import gzip
import io
import os
import tarfile
from typing import Optional

import numpy as np

from overinterp_jax.data.image_folder import CIFAR10_CLASSES, ExpectedCounts
from overinterp_jax.data.in_memory import load_image_folder_splits
from overinterp_jax.data.labelled import LabelledImages
from overinterp_jax.store import hashing

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slices",
                    "cifar10_test_1000.tar.gz")
SHA256 = "32cd9148f4f36b7c85922ca0b9a418d9de5a1688bfa6f078928f1e44efc7d4d2"
PER_CLASS = 100


def _check_counts(loaded: dict[str, LabelledImages],
                  expected_counts: Optional[ExpectedCounts]) -> None:
  for split, expected in (expected_counts or {}).items():
    have = len(loaded[split]) if split in loaded else 0
    want = expected if isinstance(expected, int) else sum(expected.values())
    if have != want:
      raise ValueError(
          f"config.data.path is empty, so the data is the CIFAR-10 slice shipped in the "
          f"package ({PER_CLASS * len(CIFAR10_CLASSES)} test images, no train images), but "
          f"{want} {split} images are expected (config.data.expected_{split}). Training and "
          "full runs need the whole dataset: --config.data.path=<image folder or .tar.gz> or "
          "--config.data.source=tfds (docs/data.md).")


def load(expected_counts: Optional[ExpectedCounts] = None) -> dict[str, LabelledImages]:
  """``{"train": 0 images, "test": 1,000 images}`` of the shipped slice.

  Images ``[N, 32, 32, 3]`` uint8, labels ``[N]`` int32 in CIFAR-10 order
  (airplane … truck). The file's sha256 is checked first.

  Raises:
    ValueError: the file differs from the one shipped, or ``expected_counts``
      (per split, a total or ``{class: count}``) asks for other counts.
  """
  digest = hashing.file_sha256(PATH)
  if digest != SHA256:
    raise ValueError(f"{PATH} has sha256 {digest}, expected {SHA256}: the shipped data "
                     "slice is damaged; reinstall the package.")
  test = load_image_folder_splits(PATH, ("test",), progress=False)["test"]
  train = LabelledImages(np.zeros((0,) + test.images.shape[1:], np.uint8),
                         np.zeros((0,), np.int32), test.class_names)
  loaded = {"train": train, "test": test}
  _check_counts(loaded, expected_counts)
  return loaded


def write(archive: str, out: str = PATH, per_class: int = PER_CLASS) -> str:
  """Writes the first ``per_class`` test images (by file name) of each class of the image-folder
  ``archive`` to ``out`` as a reproducible ``.tar.gz``; returns its sha256."""
  chosen: dict[str, dict[str, bytes]] = {}
  with tarfile.open(archive, mode="r|*") as src:
    for member in src:
      parts = [p for p in member.name.split("/") if p not in ("", ".")]
      if not member.isfile() or len(parts) < 3 or parts[-3] != "test":
        continue
      fh = src.extractfile(member)
      chosen.setdefault(parts[-2], {})[parts[-1]] = fh.read() if fh is not None else b""
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as dst:
    for cls in sorted(chosen):
      for name in sorted(chosen[cls])[:per_class]:
        data = chosen[cls][name]
        info = tarfile.TarInfo(f"test/{cls}/{name}")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        dst.addfile(info, io.BytesIO(data))
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "wb") as fh:
    with gzip.GzipFile(fileobj=fh, mode="wb", compresslevel=9, mtime=0, filename="") as gz:
      gz.write(buffer.getvalue())
  return hashing.file_sha256(out)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--archive", required=True,
                      help="CIFAR-10 image-folder archive (.tar.gz of <split>/<class>/<image>)")
  parser.add_argument("--out", default=PATH, help="where to write the slice")
  args = parser.parse_args(argv)
  print(f"{args.out}: sha256 {write(args.archive, args.out)}")


if __name__ == "__main__":
  main()
