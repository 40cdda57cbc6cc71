"""Unreadable image files of streamed data (``config.runtime.bad_files``): found before any
work and named all at once ("check"), or left out, named, and the run goes on ("skip")."""
import logging
import os
import re

import numpy as np
import pytest

from configs import cifar10
from overinterp_jax import config_checks
from overinterp_jax import data as data_lib
from overinterp_jax.data import image_folder, loader
from test_data import encode, pixel_pattern

SIZE = 12


def _jpeg(split, cls, i):
  return encode(pixel_pattern(split, cls, i, SIZE), "JPEG")


@pytest.fixture
def folder(tmp_path):
  """``train/{ant,bee}`` and ``test/{ant,bee}``, 4 JPEGs each; in train/bee one file is
  empty and one truncated (its second half lost, as by an interrupted copy). Returns the
  root and the two bad files."""
  root = tmp_path / "images"
  for split in ("train", "test"):
    for cls in ("ant", "bee"):
      (root / split / cls).mkdir(parents=True)
      for i in range(4):
        (root / split / cls / f"{i}.jpg").write_bytes(_jpeg(split, cls, i))
  empty, truncated = root / "train" / "bee" / "1.jpg", root / "train" / "bee" / "3.jpg"
  empty.write_bytes(b"")
  data = _jpeg("train", "bee", 3)
  truncated.write_bytes(data[:len(data) // 2])
  return root, [str(empty), str(truncated)]


def _load(root, tmp_path, bad_files, max_bad_files=100):
  cfg = cifar10.get_config().data
  cfg.update({"source": "image_folder", "path": str(root), "in_memory": False,
              "view_size": SIZE, "normalization": "imagenet", "expected_train": 8,
              "expected_test": 8})
  return data_lib.load_for_config(cfg, str(tmp_path / "work"), progress=False,
                                  bad_files=bad_files, max_bad_files=max_bad_files)


def test_the_check_names_every_bad_file_in_one_error_before_any_work(folder, tmp_path):
  root, bad = folder
  with pytest.raises(ValueError) as e:
    _load(root, tmp_path, "check")
  message = str(e.value)
  assert message.startswith("2 of the 8 images of the train split cannot be read:")
  assert f"{bad[0]}: the file is empty (0 bytes)" in message
  assert re.search(rf"{re.escape(bad[1])}: OSError: .*[Tt]runcated", message), message
  assert "config.runtime.bad_files='skip'" in message
  assert not (tmp_path / "work").exists()


def test_skip_names_every_bad_file_and_goes_on_without_them(folder, tmp_path, caplog):
  root, bad = folder
  with caplog.at_level(logging.WARNING):
    ds = _load(root, tmp_path, "skip")
  left_out = [m for m in caplog.messages if m.startswith("Leaving out")]
  assert [m.split()[2] for m in left_out] == bad
  assert ds.num_examples("train") == 6 and ds.num_examples("test") == 8
  train = ds.source("train")
  assert [train.example_id(i) for i in range(len(train))] == [
      "train/ant/0.jpg", "train/ant/1.jpg", "train/ant/2.jpg", "train/ant/3.jpg",
      "train/bee/0.jpg", "train/bee/2.jpg"]
  np.testing.assert_array_equal(ds.labels("train"), [0, 0, 0, 0, 1, 1])
  x, y = ds.feed("train").batch(np.arange(6))  # every image left decodes
  assert x.shape == (6, SIZE, SIZE, 3) and y.tolist() == [0, 0, 0, 0, 1, 1]
  again = _load(root, tmp_path, "skip")  # the same files left out, in the same order
  np.testing.assert_array_equal(again.feed("train").batch(np.arange(6))[0], x)


def test_skip_stops_beyond_its_budget_naming_every_bad_file(folder, tmp_path):
  root, bad = folder
  with pytest.raises(ValueError, match=r"2 of the 8 images of the train split cannot be read, "
                                       r"more than config.runtime.max_bad_files=1") as e:
    _load(root, tmp_path, "skip", max_bad_files=1)
  assert all(path in str(e.value) for path in bad)


def test_off_finds_a_bad_file_only_at_its_batch(folder, tmp_path):
  root, bad = folder
  ds = _load(root, tmp_path, "off")
  assert ds.num_examples("train") == 8
  ds.feed("train").batch(np.arange(4))  # the ant images
  with pytest.raises(ValueError, match=f"Cannot decode image {bad[0]}"):
    ds.feed("train").batch(np.arange(4, 8))


def test_skip_replaces_an_image_that_fails_later_and_counts_it(folder, tmp_path, caplog):
  """A file that passed the check but cannot be read when its batch comes (here: deleted)
  becomes a grey image with its label, named in a warning; the budget left after the check
  (3 - 2 = 1) then stops the run at the second such file."""
  root, _ = folder
  ds = _load(root, tmp_path, "skip", max_bad_files=3)
  os.remove(root / "train" / "ant" / "2.jpg")
  with caplog.at_level(logging.WARNING):
    x, y = ds.feed("train").batch(np.array([2, 4]))
  assert [m for m in caplog.messages if "train/ant/2.jpg" in m and "grey" in m]
  grey = ds.prepare(np.full((1, SIZE, SIZE, 3), 128, np.uint8))[0]
  np.testing.assert_array_equal(x[0], grey)
  assert y.tolist() == [0, 1]
  os.remove(root / "train" / "bee" / "0.jpg")
  with pytest.raises(ValueError, match=r"(?s)2 images of the train split failed to decode, "
                                       r"more than the 1 .*\n  train/ant/2.jpg: .*\n  "
                                       r"train/bee/0.jpg: "):
    ds.feed("train").batch(np.array([4]))


def test_the_file_check_needs_no_decoding_and_tells_trailing_data_from_truncation(tmp_path):
  image = pixel_pattern("x", "y", 0, 32)
  cases = {"sound.jpg": encode(image, "JPEG"), "sound.png": encode(image, "PNG"),
           "png_named.jpg": encode(image, "PNG"),
           "trailing_data.jpg": encode(image, "JPEG") + os.urandom(3000),
           "truncated.png": encode(image, "PNG")[:-40], "text.jpg": b"not an image at all"}
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
  problems = dict((os.path.basename(p), why) for p, why in image_folder.find_bad_files(
      sorted(str(tmp_path / n) for n in cases), progress=False))
  assert sorted(problems) == ["text.jpg", "truncated.png"]
  assert problems["text.jpg"].startswith("UnidentifiedImageError: cannot identify image file")


def test_skip_applies_to_streamed_data_only():
  config = cifar10.get_config()
  config.runtime.bad_files = "skip"
  with pytest.raises(ValueError, match=r"config.runtime.bad_files='skip' leaves unreadable "
                                       r"files out of streamed data"):
    config_checks.validate_config(config, 1)
  config.runtime.bad_files = "ignore"
  config.data.in_memory = False
  config.data.path = "/"
  with pytest.raises(ValueError, match=r"config.runtime.bad_files must be one of \['check', "
                                       r"'skip', 'off'\]"):
    config_checks.validate_config(config, 1)
  assert loader.BAD_FILES == ("check", "skip", "off")
