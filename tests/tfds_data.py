"""A small CIFAR-10 prepared by TFDS's own writer as ArrayRecord files, without TensorFlow
(shared by tests): TFDS's ``cifar10`` builder with its examples generated here, PNG-encoded
(TensorFlow would encode numpy images), so the files are what ``tfds build cifar10
--file_format=array_record`` writes, only fewer and random.

  python tests/tfds_data.py DATA_DIR [NUM_TRAIN NUM_TEST]
"""
import io
import sys

import numpy as np
from PIL import Image


def write_cifar10(data_dir, num_train: int = 10, num_test: int = 10, seed: int = 0) -> dict:
  """Writes ``data_dir/cifar10/3.0.2`` with ``num_train``/``num_test`` random 32×32 images
  (label ``i % 10``, id ``<split>_<i:05d>`` as TFDS's builder names them).

  Returns ``{split: {id: (image [32, 32, 3] uint8, label)}}``; TFDS stores the records
  shuffled, so tests look them up by id.
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from tensorflow_datasets.image_classification import cifar  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  made = {split: {f"{split}_{i:05d}": (rng.integers(0, 256, (32, 32, 3), np.uint8), i % 10)
                  for i in range(n)}
          for split, n in (("train", num_train), ("test", num_test))}

  class Cifar10(cifar.Cifar10, skip_registration=True):
    name = "cifar10"

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate(examples) for split, examples in made.items()}

    def _generate(self, examples):
      for i, (key, (image, label)) in enumerate(examples.items()):
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        yield i, {"id": key, "image": png.getvalue(), "label": label}

  builder = Cifar10(data_dir=str(data_dir), file_format="array_record")
  builder.info.features["label"].names = ["airplane", "automobile", "bird", "cat", "deer",
                                          "dog", "frog", "horse", "ship", "truck"]
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig())
  return made


if __name__ == "__main__":
  write_cifar10(sys.argv[1], *map(int, sys.argv[2:4]))
