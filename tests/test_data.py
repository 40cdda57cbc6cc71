"""Data: image folders (directory and .tar.gz), the decoded-array cache, synthetic data,
normalisation, augmentation of images with their masks, TFDS errors, the dispatcher."""
import io
import os
import tarfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from overinterp_jax import cpu_budget, data as data_lib
from overinterp_jax.config_schema import base_config
from overinterp_jax.data import (augment, image_folder, in_memory, loader, normalize, synthetic,
                                 tfds_source)

REAL_ARCHIVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                            "data", "cifar10_jpeg.tar.gz")


pytestmark = pytest.mark.usefixtures("fast_compile")


# ----------------------------------------------------------------------------- tiny image folders

# Classes deliberately listed out of order: labels must follow the sorted names.
COUNTS = {"train": {"zebra": 3, "ant": 2}, "test": {"zebra": 1, "ant": 2}}


def pixel_pattern(split, cls, i, size=6):
  """A distinct, exactly reproducible image (saved losslessly as PNG)."""
  seed = zlib.crc32(f"{split}/{cls}/{i}".encode())
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def encode(array, fmt):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


def make_tree(root, counts=COUNTS, size=6):
  """Writes ``root/<split>/<class>/<i>.png`` (and one JPEG per class); returns the arrays."""
  expected = {}
  for split, classes in counts.items():
    for cls, n in classes.items():
      os.makedirs(os.path.join(root, split, cls), exist_ok=True)
      for i in range(n):
        arr = pixel_pattern(split, cls, i, size)
        with open(os.path.join(root, split, cls, f"{i:04d}.png"), "wb") as fh:
          fh.write(encode(arr, "PNG"))
        expected[(split, cls, i)] = arr
      # Files that are not images are ignored.
      with open(os.path.join(root, split, cls, "notes.txt"), "w") as fh:
        fh.write("not an image")
  return expected


def make_tar(tar_path, root, arcname=""):
  with tarfile.open(tar_path, "w:gz") as tar:
    for split in sorted(os.listdir(root)):
      tar.add(os.path.join(root, split), arcname=os.path.join(arcname, split) if arcname else split)
  return tar_path


@pytest.fixture
def tree(tmp_path):
  root = str(tmp_path / "folder")
  return root, make_tree(root)


def check_loaded(loaded, expected):
  for split, classes in COUNTS.items():
    d = loaded[split]
    assert d.class_names == ("ant", "zebra")
    assert d.images.dtype == np.uint8 and d.images.shape[1:] == (6, 6, 3)
    assert d.labels.dtype == np.int32
    assert d.class_counts() == {"ant": classes["ant"], "zebra": classes["zebra"]}
    # Sorted by class, then by file name.
    k = 0
    for label, cls in enumerate(d.class_names):
      for i in range(classes[cls]):
        assert d.labels[k] == label
        np.testing.assert_array_equal(d.images[k], expected[(split, cls, i)])
        k += 1


def test_load_directory(tree):
  root, expected = tree
  check_loaded(in_memory.load_image_folder_splits(root, progress=False), expected)


@pytest.mark.parametrize("arcname", ["", "top"])
def test_load_tar_gz_equals_directory(tree, tmp_path, arcname):
  root, expected = tree
  tar = make_tar(str(tmp_path / "folder.tar.gz"), root, arcname)
  loaded = in_memory.load_image_folder_splits(tar, progress=False)
  check_loaded(loaded, expected)
  only_test = in_memory.load_image_folder(tar, "test", progress=False)
  np.testing.assert_array_equal(only_test.images, loaded["test"].images)


@pytest.mark.parametrize("archived", [False, True])
def test_in_memory_and_streamed_read_the_same_examples(tree, tmp_path, archived):
  """One loader: data held in memory is the streamed sources read whole, so both give the
  same images, labels and example ids (``<split>/<class>/<file>``), in the same order."""
  root, _ = tree
  path = make_tar(str(tmp_path / "f.tar.gz"), root, "top") if archived else root
  config = base_config().data
  config.path, config.source = path, "image_folder"
  config.cache_dir = str(tmp_path / "cache")
  held = data_lib.load_for_config(config, str(tmp_path), progress=False)
  config.in_memory = False
  streamed = data_lib.load_for_config(config, str(tmp_path), progress=False)
  for split in ("train", "test"):
    a, b = held.source(split), streamed.source(split)
    assert len(a) == len(b) and a.class_names == b.class_names
    ids = [b.example_id(i) for i in range(len(b))]
    assert [a.example_id(i) for i in range(len(a))] == ids
    assert ids[0].startswith(f"{split}/") and ids[0].count("/") == 2
    images, labels = b.gather(np.arange(len(b)))
    np.testing.assert_array_equal(a.images, images)
    np.testing.assert_array_equal(a.labels, labels)
  # The decoded arrays come back from the .npz cache with their ids; no extraction is left.
  again = data_lib.load_for_config(dict_to_in_memory(config), str(tmp_path), progress=False)
  assert again.train.ids == held.train.ids
  assert not [d for d in os.listdir(config.cache_dir) if d.startswith("extracting-")]


def dict_to_in_memory(config):
  config = config.copy_and_resolve_references()
  config.in_memory = True
  return config


def test_jpeg_and_grayscale_become_rgb(tmp_path):
  root = tmp_path / "jpg"
  os.makedirs(root / "train" / "a")
  gray = np.full((4, 5), 200, np.uint8)
  (root / "train" / "a" / "0.JPEG").write_bytes(encode(np.stack([gray] * 3, -1), "JPEG"))
  (root / "train" / "a" / "1.png").write_bytes(encode(gray, "PNG"))
  d = in_memory.load_image_folder(str(root), "train", progress=False)
  assert d.images.shape == (2, 4, 5, 3)
  assert abs(int(d.images[0].mean()) - 200) <= 2 and np.all(d.images[1] == 200)


def test_expected_counts(tree):
  root, _ = tree
  in_memory.load_image_folder(root, "test", expected_counts={"test": 3}, progress=False)
  in_memory.load_image_folder(root, "test", expected_counts={"test": {"ant": 2, "zebra": 1}},
                                 progress=False)
  with pytest.raises(ValueError, match=r"split 'test'.*has 3 images, expected 4"):
    in_memory.load_image_folder(root, "test", expected_counts={"test": 4}, progress=False)
  with pytest.raises(ValueError, match="per-class counts"):
    in_memory.load_image_folder(root, "test", expected_counts={"test": {"ant": 1, "zebra": 2}},
                                   progress=False)


# ----------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
  missing = str(tmp_path / "nowhere.tar.gz")
  with pytest.raises(FileNotFoundError, match="nowhere.tar.gz"):
    in_memory.load_image_folder(missing, "train")


def test_not_an_archive(tmp_path):
  path = tmp_path / "plain.txt"
  path.write_text("hello")
  with pytest.raises(ValueError, match="not a tar archive"):
    in_memory.load_image_folder(str(path), "train")


def test_missing_split(tree, tmp_path):
  root, _ = tree
  with pytest.raises(ValueError, match=r"Split 'val' not found.*\['test', 'train'\]"):
    in_memory.load_image_folder(root, "val", progress=False)
  tar = make_tar(str(tmp_path / "f.tar.gz"), root)
  with pytest.raises(ValueError, match=r"Split 'val' not found in archive.*\['test', 'train'\]"):
    in_memory.load_image_folder(tar, "val", progress=False)


def test_corrupt_image_is_named(tree, tmp_path):
  root, _ = tree
  bad = os.path.join(root, "train", "zebra", "0001.png")
  with open(bad, "wb") as fh:
    fh.write(b"\x89PNG\r\n\x1a\n garbage")
  with pytest.raises(ValueError, match=r"Cannot decode image .*train/zebra/0001\.png"):
    in_memory.load_image_folder(root, "train", progress=False)
  tar = make_tar(str(tmp_path / "bad.tar.gz"), root)
  with pytest.raises(ValueError, match=r"Cannot decode image .*bad\.tar\.gz:train/zebra/0001\.png"):
    in_memory.load_image_folder(tar, "train", progress=False)
  # The test split has no corrupt file and still loads from the same archive.
  assert len(in_memory.load_image_folder(tar, "test", progress=False)) == 3


def test_every_bad_image_of_an_archive_is_listed_and_an_empty_one_named(tree, tmp_path,
                                                                         monkeypatch):
  root, _ = tree
  open(os.path.join(root, "train", "ant", "0000.png"), "wb").close()  # zero bytes
  for i in range(3):
    with open(os.path.join(root, "test", "zebra", f"bad{i}.png"), "wb") as fh:
      fh.write(b"not a png")
  tar = make_tar(str(tmp_path / "bad.tar.gz"), root)
  with pytest.raises(ValueError) as err:
    in_memory.load_image_folder_splits(tar, progress=False)
  message = str(err.value)
  assert message.startswith(f"4 image(s) of archive {tar} cannot be decoded:")
  assert "train/ant/0000.png: the file is empty (0 bytes)" in message
  for i in range(3):
    assert f"test/zebra/bad{i}.png" in message
  monkeypatch.setattr(image_folder, "MAX_LISTED_BAD_FILES", 2)
  with pytest.raises(ValueError, match=r"\.\.\. and 2 more\.$"):
    in_memory.load_image_folder_splits(tar, progress=False)


def test_empty_class_folder(tree, tmp_path):
  root, _ = tree
  os.makedirs(os.path.join(root, "train", "mole"))
  with pytest.raises(ValueError, match=r"train/mole has no images"):
    in_memory.load_image_folder(root, "train", progress=False)
  tar = make_tar(str(tmp_path / "empty.tar.gz"), root)
  with pytest.raises(ValueError, match=r"empty\.tar\.gz:train/mole has no images"):
    in_memory.load_image_folder(tar, "train", progress=False)


def test_mixed_image_sizes(tree):
  root, _ = tree
  with open(os.path.join(root, "test", "ant", "0009.png"), "wb") as fh:
    fh.write(encode(np.zeros((7, 6, 3), np.uint8), "PNG"))
  with pytest.raises(ValueError, match=r"0009\.png.*\(7, 6, 3\).*same size"):
    in_memory.load_image_folder(root, "test", progress=False)


def test_splits_with_different_classes(tree):
  root, _ = tree
  os.makedirs(os.path.join(root, "test", "bee"))
  with open(os.path.join(root, "test", "bee", "0.png"), "wb") as fh:
    fh.write(encode(pixel_pattern("test", "bee", 0), "PNG"))
  with pytest.raises(ValueError, match="different classes"):
    in_memory.load_image_folder_splits(root, progress=False)


# ----------------------------------------------------------------------------- cache


@pytest.fixture
def cached_tar(tree, tmp_path):
  root, expected = tree
  tar = make_tar(str(tmp_path / "data.tar.gz"), root)
  cache = str(tmp_path / "cache")
  first = in_memory.load_image_folder_splits(tar, cache_dir=cache, progress=False)
  return tar, cache, first


def no_decoding(monkeypatch):
  def fail(*args):
    raise AssertionError("decoded an image although a valid cache exists")
  monkeypatch.setattr(image_folder, "decode_image", fail)


def test_cache_is_written_atomically_and_reused(cached_tar, monkeypatch):
  tar, cache, first = cached_tar
  files = sorted(os.listdir(cache))
  assert len(files) == 2 and all(f.endswith(".npz") for f in files)  # no temporary leftovers
  no_decoding(monkeypatch)
  again = in_memory.load_image_folder_splits(tar, cache_dir=cache, progress=False)
  for split in ("train", "test"):
    np.testing.assert_array_equal(again[split].images, first[split].images)
    np.testing.assert_array_equal(again[split].labels, first[split].labels)
    assert again[split].class_names == first[split].class_names


def test_corrupt_cache_is_rebuilt(cached_tar):
  tar, cache, first = cached_tar
  path = in_memory.cache_path(cache, tar, "train")
  with open(path, "r+b") as fh:  # truncate the zip: unreadable
    fh.truncate(100)
  again = in_memory.load_image_folder(tar, "train", cache_dir=cache, progress=False)
  np.testing.assert_array_equal(again.images, first["train"].images)
  with np.load(path) as z:  # rewritten, valid
    assert z["images"].shape == first["train"].images.shape


def test_cache_with_wrong_counts_or_shape_is_rebuilt(cached_tar, monkeypatch):
  tar, cache, first = cached_tar
  path = in_memory.cache_path(cache, tar, "train")
  with np.load(path) as z:
    fields = dict(z)
  # Drop one image but keep the source fingerprint: the stored counts no longer match.
  bad = dict(fields, images=fields["images"][:-1], labels=fields["labels"][:-1])
  np.savez(path, **bad)
  assert len(in_memory.load_image_folder(tar, "train", cache_dir=cache, progress=False)) == 5
  # Wrong image shape (not [N, H, W, 3]).
  np.savez(path, **dict(fields, images=fields["images"][..., :1]))
  assert in_memory.load_image_folder(tar, "train", cache_dir=cache,
                                        progress=False).images.shape[-1] == 3
  # A valid cache contradicting expected_counts is rebuilt, and then the source is checked too.
  with pytest.raises(ValueError, match="expected 6"):
    in_memory.load_image_folder(tar, "train", cache_dir=cache, expected_counts={"train": 6},
                                   progress=False)


def test_cache_of_a_changed_source_is_rebuilt(tree, tmp_path):
  root, _ = tree
  cache = str(tmp_path / "cache")
  assert len(in_memory.load_image_folder(root, "test", cache_dir=cache, progress=False)) == 3
  with open(os.path.join(root, "test", "zebra", "0007.png"), "wb") as fh:
    fh.write(encode(pixel_pattern("test", "zebra", 7), "PNG"))
  assert len(in_memory.load_image_folder(root, "test", cache_dir=cache, progress=False)) == 4


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_learnable():
  a = synthetic.make_synthetic(200, 100, image_size=8, num_classes=4, seed=3)
  b = synthetic.make_synthetic(200, 100, image_size=8, num_classes=4, seed=3)
  c = synthetic.make_synthetic(200, 100, image_size=8, num_classes=4, seed=4)
  for split in ("train", "test"):
    np.testing.assert_array_equal(a[split].images, b[split].images)
    np.testing.assert_array_equal(a[split].labels, b[split].labels)
  assert not np.array_equal(a["train"].images, c["train"].images)
  assert not np.array_equal(a["train"].images, a["test"].images[:100].repeat(2, 0))
  train, test = a["train"], a["test"]
  assert train.images.shape == (200, 8, 8, 3) and train.images.dtype == np.uint8
  assert train.class_counts() == {f"class_{k}": 50 for k in range(4)}
  # Nearest class mean separates the classes: a tiny model can learn them.
  means = np.stack([train.images[train.labels == k].mean(0) for k in range(4)]).reshape(4, -1)
  dist = ((test.images.reshape(len(test), 1, -1).astype(float) - means) ** 2).sum(-1)
  assert (dist.argmin(1) == test.labels).mean() > 0.95


# ----------------------------------------------------------------------------- normalisation


def test_cifar_constants_and_round_trip():
  np.testing.assert_allclose(normalize.CIFAR10.mean * 255, (125.3, 123.0, 113.9), rtol=1e-6)
  np.testing.assert_allclose(normalize.CIFAR10.std * 255, (63.0, 62.1, 66.7), rtol=1e-6)
  pixels = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
  x = normalize.CIFAR10.normalize(pixels)
  assert x.dtype == np.float32
  np.testing.assert_allclose(normalize.CIFAR10.denormalize(x) * 255, pixels, atol=1e-3)
  # The mean colour maps to 0, the masked value.
  np.testing.assert_allclose(normalize.CIFAR10.normalize(normalize.CIFAR10.mean * 255), 0,
                             atol=1e-6)
  assert isinstance(normalize.CIFAR10.normalize(jnp.asarray(pixels)), jax.Array)


def test_channel_stats():
  rng = np.random.default_rng(1)
  pixels = rng.integers(0, 256, (10, 5, 5, 3), dtype=np.uint8)
  stats = normalize.channel_stats(pixels, chunk=3)
  np.testing.assert_allclose(stats.mean, pixels.mean((0, 1, 2)) / 255, rtol=1e-5)
  np.testing.assert_allclose(stats.std, pixels.std((0, 1, 2)) / 255, rtol=1e-5)
  x = stats.normalize(pixels)
  np.testing.assert_allclose(x.mean((0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(x.std((0, 1, 2)), 1, atol=1e-4)
  with pytest.raises(ValueError, match="std must be > 0"):
    normalize.Normalization([0.5], [0.0])


# ----------------------------------------------------------------------------- augmentation


def encoded_image_and_mask(batch, h, w, seed=0):
  """Pixel (i, j) holds its id i·w + j + 1, positive where the mask keeps it, negative where not."""
  mask = np.random.default_rng(seed).random((batch, h, w)) < 0.5
  ids = (np.arange(h * w) + 1).reshape(h, w).astype(np.float32)
  image = np.where(mask, ids, -ids)[..., None].repeat(3, -1)
  return jnp.asarray(image), jnp.asarray(mask)


def all_crops_and_flips(image, padding):
  """Every crop/flip of ``image [H, W, C]`` (numpy reference)."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  for dy in range(2 * padding + 1):
    for dx in range(2 * padding + 1):
      crop = padded[dy:dy + h, dx:dx + w]
      yield crop
      yield crop[:, ::-1]


@pytest.mark.parametrize("mask_shape", ["hw", "hw1"])
def test_augmentation_keeps_image_and_mask_aligned(mask_shape):
  images, masks = encoded_image_and_mask(16, 8, 8)
  if mask_shape == "hw1":
    masks = masks[..., None]
  fn = jax.jit(lambda k, x, m: augment.augment_batch(k, x, m, padding=2))
  out, out_masks = fn(jax.random.key(0), images, masks)
  assert out.shape == images.shape and out_masks.shape == masks.shape
  assert out_masks.dtype == jnp.bool_
  out, out_masks = np.asarray(out), np.asarray(out_masks).reshape(16, 8, 8)
  # Same transform: kept pixels (id > 0) exactly where the mask is True;
  # padded pixels are 0 in the image and False in the mask.
  np.testing.assert_array_equal(out_masks, out[..., 0] > 0)
  assert np.all(out[..., 0] == out[..., 2])
  # Each output is one crop/flip of its input, and the draws differ across the batch.
  kinds = set()
  for i in range(16):
    matches = [k for k, c in enumerate(all_crops_and_flips(np.asarray(images[i]), 2))
               if np.array_equal(c, out[i])]
    assert matches, f"image {i} is not a crop/flip of its input"
    kinds.add(matches[0])
  assert len(kinds) > 4
  # Same key, same result; a different key changes it.
  again, _ = fn(jax.random.key(0), images, masks)
  np.testing.assert_array_equal(np.asarray(again), out)
  other, _ = fn(jax.random.key(1), images, masks)
  assert not np.array_equal(np.asarray(other), out)


def test_augmentation_flips_and_pads_with_masked_value():
  image = jnp.arange(1.0, 17.0).reshape(4, 4, 1)
  mask = jnp.ones((4, 4), bool)
  seen_flip = seen_pad = False
  for s in range(20):
    out, m = augment.random_crop_flip(jax.random.key(s), image, mask, padding=1)
    out, m = np.asarray(out)[..., 0], np.asarray(m)
    np.testing.assert_array_equal(m, out != 0)  # padding: value 0 and mask False
    seen_pad |= bool((out == 0).any())
    rows = out[(out != 0).all(1)]
    seen_flip |= bool(len(rows) and rows[0][0] > rows[0][-1])
  assert seen_flip and seen_pad
  with pytest.raises(ValueError, match="does not match image shape"):
    augment.random_crop_flip(jax.random.key(0), image, jnp.ones((3, 4), bool))


def test_resize_images_downsamples_and_keeps_constants():
  images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  assert augment.resize_images(images, 8, 8) is images
  small = augment.resize_images(images, 4, 6)
  assert small.shape == (2, 4, 6, 3)
  const = jnp.full((1, 8, 8, 3), 0.7)
  np.testing.assert_allclose(np.asarray(augment.resize_images(const, 4, 4)), 0.7, rtol=1e-6)
  # Antialiased: 4x smaller, columns lit every 4th pixel come out near their mean (0.25);
  # plain bilinear sampling would read the unlit pixels between them (0).
  stripes = jnp.broadcast_to((jnp.arange(16) % 4 == 0).astype(jnp.float32), (16, 16))
  small = np.asarray(augment.resize_images(stripes[None, :, :, None], 4, 4))
  assert np.all((small > 0.15) & (small < 0.35)), small[0, :, :, 0]


def test_augment_images_matches_augment_batch():
  images, _ = encoded_image_and_mask(3, 32, 32)
  key = jax.random.key(5)
  np.testing.assert_array_equal(np.asarray(augment.augment_images(key, images)),
                                np.asarray(augment.augment_batch(key, images)[0]))


def test_augment_images_without_flip_only_crops():
  """Columns numbered 1..8: a crop shifts them by at most the padding, never mirrors."""
  images = jnp.broadcast_to(jnp.arange(1.0, 9.0)[None, None, :, None], (32, 8, 8, 1))
  out = np.asarray(augment.augment_images(jax.random.key(0), images, padding=2, flip=False))
  columns = np.arange(1.0, 9.0)
  for row in out[:, :, :, 0].reshape(-1, 8):
    kept = row != 0
    assert np.all(np.diff(row[kept]) == 1)  # in order: not mirrored
    assert np.all(np.abs(row[kept] - columns[kept]) <= 2)
  assert len({tuple(r) for r in out[:, 0, :, 0]}) > 1  # crops differ between images
  np.testing.assert_array_equal(
      np.asarray(augment.augment_images(jax.random.key(0), images, padding=0, flip=False)),
      np.asarray(images))
  mirrored = np.asarray(augment.augment_images(jax.random.key(0), images, padding=0))
  assert (mirrored[:, 0, 0, 0] == 8).any() and (mirrored[:, 0, 0, 0] == 1).any()


def test_alternating_flips_mirror_each_image_every_other_epoch():
  first = cpu_budget.alternating_flips(3, 0, 1000)
  assert first.dtype == bool and 400 < first.sum() < 600
  np.testing.assert_array_equal(cpu_budget.alternating_flips(3, 1, 1000), ~first)
  np.testing.assert_array_equal(cpu_budget.alternating_flips(3, 2, 1000), first)
  np.testing.assert_array_equal(cpu_budget.alternating_flips(3, 0, 1000), first)  # seeded
  assert not np.array_equal(cpu_budget.alternating_flips(4, 0, 1000), first)
  rows = np.arange(2 * 2 * 3 * 1, dtype=np.uint8).reshape(2, 2, 3, 1)
  feed = loader.array_feed(rows, np.zeros(2, np.int32), lambda x: x.astype(np.float32))
  out, _ = feed.batch(np.array([0, 1]), mirror=np.array([True, False]))
  np.testing.assert_array_equal(out[0], rows[0, :, ::-1])
  np.testing.assert_array_equal(out[1], rows[1])


# ----------------------------------------------------------------------------- TFDS (offline)


def test_tfds_without_prepared_data_fails_fast(tmp_path):
  with pytest.raises(ValueError, match="needs data_dir"):
    tfds_source.tfds_data_source("cifar10", "train", "")
  with pytest.raises(FileNotFoundError, match=r"not prepared in data_dir.*tfds build cifar10"):
    tfds_source.tfds_data_source("cifar10", "train", str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not prepared"):
    data_lib.load_dataset("tfds", name="cifar10", data_dir=str(tmp_path / "missing"))
  with pytest.raises(ValueError, match=r"Unsupported TFDS dataset 'mnist'"):
    tfds_source.tfds_data_source("mnist", "train", str(tmp_path))
  with pytest.raises(ValueError, match="too large"):
    in_memory.load_tfds_splits("imagenet2012", str(tmp_path))


def test_tfds_cifar10_in_memory_checks_counts_and_keeps_its_ids(tmp_path):
  """CIFAR-10 written by TFDS's own writer (tests/tfds_data.py): ``expected_test`` is
  verified as for image folders, and examples keep TFDS's ``id`` (``test_00003``)."""
  from tfds_data import write_cifar10
  made = write_cifar10(tmp_path / "tfds", num_train=10, num_test=20)
  cfg = base_config().data
  cfg.update({"source": "tfds", "name": "cifar10", "data_dir": str(tmp_path / "tfds"),
              "expected_train": 10, "expected_test": 21})
  with pytest.raises(ValueError, match=r"test split has 20 images.*expected_test = 21"):
    data_lib.load_for_config(cfg, str(tmp_path / "work"), progress=False)
  cfg.expected_test = 20
  ds = data_lib.load_for_config(cfg, str(tmp_path / "work"), progress=False)
  assert ds.num_examples("train") == 10 and ds.num_examples("test") == 20
  for split in ("train", "test"):
    src = ds.source(split)
    ids = [src.example_id(i) for i in range(len(src))]
    assert sorted(ids) == sorted(made[split])
    for i, key in enumerate(ids):
      image, label = made[split][key]
      np.testing.assert_array_equal(src[i][0], image)
      assert src[i][1] == label


# ----------------------------------------------------------------------------- dispatcher


def test_load_dataset_synthetic_and_prepare():
  ds = data_lib.load_dataset("synthetic", num_train=40, num_test=10, image_size=8,
                             num_classes=4, seed=1)
  assert ds.train_images.shape == (40, 8, 8, 3) and ds.test_labels.shape == (10,)
  assert ds.num_classes == 4 and ds.image_shape == (8, 8, 3)
  x = ds.prepare(ds.train_images)
  assert x.dtype == np.float32
  np.testing.assert_allclose(x.mean((0, 1, 2)), 0, atol=1e-4)  # training-set statistics


def test_load_dataset_image_folder(tree, tmp_path):
  root, _ = tree
  tar = make_tar(str(tmp_path / "d.tar.gz"), root)
  ds = data_lib.load_dataset("image_folder", path=tar, cache_dir=str(tmp_path / "c"),
                             progress=False, normalization="cifar10")
  assert len(ds.train_labels) == 5 and len(ds.test_labels) == 3
  assert ds.class_names == ("ant", "zebra")
  assert ds.normalization is normalize.CIFAR10


def test_load_for_config(tmp_path):
  cfg = base_config().data
  cfg.update({"source": "synthetic", "num_train": 16, "num_test": 8, "image_size": 4})
  ds = data_lib.load_for_config(cfg, str(tmp_path))
  assert ds.train_images.shape == (16, 4, 4, 3)


def test_load_dataset_errors():
  with pytest.raises(ValueError, match=r"Unknown data source 'csv'.*image_folder"):
    data_lib.load_dataset("csv")
  with pytest.raises(ValueError, match="normalization must be"):
    data_lib.load_dataset("synthetic", num_train=4, num_test=2, image_size=4,
                          normalization="purple")


def test_cifar_class_names_are_sorted():
  # Labels follow sorted folder names; for CIFAR-10 that is the official label order.
  assert list(image_folder.CIFAR10_CLASSES) == sorted(image_folder.CIFAR10_CLASSES)


@pytest.mark.slow
def test_real_cifar10_archive_test_split(tmp_path):
  """Streams the real 19 MB archive and decodes the 10,000 test JPEGs (a few seconds)."""
  if not os.path.exists(REAL_ARCHIVE):
    pytest.skip(f"{REAL_ARCHIVE} not present")
  test = in_memory.load_image_folder(
      REAL_ARCHIVE, "test", cache_dir=str(tmp_path),
      expected_counts={"test": image_folder.CIFAR10_EXPECTED_COUNTS["test"]}, progress=False)
  assert test.images.shape == (10_000, 32, 32, 3) and test.images.dtype == np.uint8
  assert test.class_names == image_folder.CIFAR10_CLASSES
  assert set(test.class_counts().values()) == {1000}
  stats = normalize.channel_stats(test.images)  # close to the paper's CIFAR-10 constants
  np.testing.assert_allclose(stats.mean, normalize.CIFAR10.mean, atol=0.02)
  np.testing.assert_allclose(stats.std, normalize.CIFAR10.std, atol=0.02)
