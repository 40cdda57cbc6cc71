"""What ships in the package: the CIFAR-10 test slice and trained weights, loaded by name."""
import io
import json
import os
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from overinterp_jax import data as data_lib
from overinterp_jax import models
from overinterp_jax.data import cifar10_slice
from overinterp_jax.models import shipped
from overinterp_jax.pipeline import trained


# ------------------------------------------------------------------------------- data slice

def test_slice_is_1000_real_cifar10_test_images_100_per_class():
  loaded = cifar10_slice.load()
  test, train = loaded["test"], loaded["train"]
  assert test.images.shape == (1000, 32, 32, 3) and test.images.dtype == np.uint8
  assert test.class_names == data_lib.CIFAR10_CLASSES
  assert set(test.class_counts().values()) == {100}
  assert train.images.shape == (0, 32, 32, 3) and train.class_names == test.class_names
  # Real photographs, not constant or synthetic patterns: every image has its own content.
  assert len({im.tobytes() for im in test.images}) == 1000
  assert 80 < test.images.mean() < 160 and test.images.std() > 40


def test_empty_data_path_loads_the_slice_and_explains_missing_train_images():
  ds = data_lib.load_dataset("image_folder", path="", expected_counts={"test": 1000})
  assert len(ds.test_images) == 1000 and len(ds.train_images) == 0
  assert ds.normalization is data_lib.CIFAR10  # CIFAR-10 classes at 32×32: its constants
  with pytest.raises(ValueError, match=r"config\.data\.path is empty.*50000 train images"):
    data_lib.load_dataset("image_folder", path="", expected_counts={"train": 50000})


def test_a_damaged_slice_is_refused(tmp_path, monkeypatch):
  copy = tmp_path / "slice.tar.gz"
  raw = bytearray(open(cifar10_slice.PATH, "rb").read())
  raw[len(raw) // 2] ^= 0xFF
  copy.write_bytes(bytes(raw))
  monkeypatch.setattr(cifar10_slice, "PATH", str(copy))
  with pytest.raises(ValueError, match="sha256"):
    cifar10_slice.load()


def _jpeg(value: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.full((4, 4, 3), value, np.uint8)).save(buf, format="JPEG")
  return buf.getvalue()


def test_slice_builder_keeps_the_first_files_of_each_test_class_byte_for_byte(tmp_path):
  archive = tmp_path / "full.tar.gz"
  members = {f"data/{split}/{cls}/{i:04d}.jpg": _jpeg(10 * i + (cls == "b"))
             for split in ("train", "test") for cls in ("b", "a") for i in (3, 0, 2, 1)}
  with tarfile.open(archive, "w:gz") as tar:
    for name, payload in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  first = cifar10_slice.write(str(archive), str(tmp_path / "s1.tar.gz"), per_class=2)
  second = cifar10_slice.write(str(archive), str(tmp_path / "s2.tar.gz"), per_class=2)
  assert first == second  # reproducible bytes
  with tarfile.open(tmp_path / "s1.tar.gz") as tar:
    names = tar.getnames()
    assert names == ["test/a/0000.jpg", "test/a/0001.jpg", "test/b/0000.jpg", "test/b/0001.jpg"]
    assert tar.extractfile("test/b/0001.jpg").read() == members["data/test/b/0001.jpg"]


# ----------------------------------------------------------------------------------- weights

def _record(num_classes=3):
  return {"model": "cnn3", "num_classes": num_classes, "bn_momentum": None,
          "image_shape": [8, 8, 3], "class_names": ["x", "y", "z"],
          "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}


def test_save_then_pretrained_round_trips_and_checks_the_weights(tmp_path):
  model = models.create_model("cnn3", num_classes=3)
  variables = model.init(jax.random.key(1), jnp.zeros((1, 8, 8, 3)), train=False)
  record = shipped.save("tiny", variables, _record(), str(tmp_path))
  assert json.loads((tmp_path / "tiny.json").read_text())["sha256"] == record["sha256"]
  assert shipped.available(str(tmp_path)) == ["tiny"]
  loaded_model, loaded = shipped.pretrained("tiny", str(tmp_path))
  x = jax.random.normal(jax.random.key(2), (5, 8, 8, 3))
  np.testing.assert_array_equal(loaded_model.apply(loaded, x, train=False),
                                model.apply(variables, x, train=False))

  with pytest.raises(ValueError, match=r"No shipped model 'other'; available: \['tiny'\]"):
    shipped.pretrained("other", str(tmp_path))
  weights = tmp_path / "tiny.msgpack"
  good = weights.read_bytes()
  weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
  with pytest.raises(ValueError, match="sha256"):
    shipped.pretrained("tiny", str(tmp_path))
  weights.write_bytes(good)
  (tmp_path / "tiny.json").write_text(json.dumps({**record, "num_classes": 5}))
  with pytest.raises(ValueError, match="shapes do not match"):
    shipped.pretrained("tiny", str(tmp_path))


def test_shipped_resnet20_reproduces_its_recorded_accuracy():
  record = shipped.info("resnet20_cifar10")
  model, variables = models.pretrained("resnet20_cifar10")
  assert record["model"] == "resnet20" and record["class_names"] == list(data_lib.CIFAR10_CLASSES)
  test = cifar10_slice.load()["test"]
  norm = data_lib.Normalization(**record["normalization"])
  base = trained.Trained(model, variables, {}, 0.0)
  logits = trained.predict_logits(base.apply, variables, norm.normalize(test.images))
  accuracy = float((logits.argmax(-1) == test.labels).mean())
  # Measured at export on 2 devices; another device count may round a borderline image.
  assert abs(accuracy - record["slice_accuracy"]) <= 0.002
  assert 0.0 < record["test_accuracy"] <= 1.0 and record["test_images"] == 10000


def test_shipped_files_are_package_data(tmp_path):
  """A non-editable install must carry them, or it has no quick start: setup.py's
  build step copies the slice and every weights file into the built package."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "setup.py", "-q", "build_py",
                         f"--build-lib={tmp_path}"], cwd=repo, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  built = tmp_path / "overinterp_jax"
  assert (built / "data" / "slices" / "cifar10_test_1000.tar.gz").read_bytes() == \
      open(cifar10_slice.PATH, "rb").read()
  for name in shipped.available():
    for suffix in (".msgpack", ".json"):
      assert (built / "models" / "weights" / f"{name}{suffix}").exists(), name + suffix
  assert shipped.available(str(built / "models" / "weights")) == shipped.available()
