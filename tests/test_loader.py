"""The input pipeline: sources, feeds, batch plans, worker processes, record shards."""
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from PIL import Image

from overinterp_jax import sharding
from overinterp_jax.data import loader, sources, transforms
from overinterp_jax.pipeline import record_shards


def _write_folder(root, sizes=((40, 30), (25, 50), (33, 33)), modes=("RGB", "L", "CMYK")):
  """``root/<split>/<class>/i.png`` with images of several sizes and modes."""
  rng = np.random.default_rng(0)
  expected = {}
  for split in ("train", "test"):
    for c, cls in enumerate(("a", "b")):
      os.makedirs(root / split / cls)
      for i, ((h, w), mode) in enumerate(zip(sizes, modes)):
        rgb = rng.integers(0, 255, (h, w, 3)).astype(np.uint8)
        img = Image.fromarray(rgb).convert(mode)
        path = root / split / cls / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}"
        img.save(path)
        expected[(split, cls, i)] = np.asarray(Image.open(path).convert("RGB"))
  return expected


def test_file_source_decodes_lazily_any_mode_to_rgb(tmp_path):
  expected = _write_folder(tmp_path)
  src = sources.FileSource.from_folder(str(tmp_path), "train")
  assert len(src) == 6 and src.class_names == ("a", "b")
  assert list(src.labels) == [0, 0, 0, 1, 1, 1]
  for i in range(6):
    image, label = src[i]
    cls = src.class_names[label]
    assert image.dtype == np.uint8 and image.shape[-1] == 3
    np.testing.assert_array_equal(image, expected[("train", cls, i % 3)])
  assert src.example_id(4) == os.path.join("train", "b", "1.png")
  again = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(again[2][0], src[2][0])


def test_archive_is_extracted_once_and_read_like_a_folder(tmp_path):
  _write_folder(tmp_path / "data")
  archive = tmp_path / "data.tar.gz"
  with tarfile.open(archive, "w:gz") as tar:
    tar.add(tmp_path / "data", arcname="top")
  cache = tmp_path / "cache"
  a = sources.folder_source(str(archive), "test", str(cache), progress=False)
  folder = sources.FileSource.from_folder(str(tmp_path / "data"), "test")
  assert len(a) == len(folder) and a.class_names == folder.class_names
  for i in range(len(a)):
    np.testing.assert_array_equal(a[i][0], folder[i][0])
  mtime = os.path.getmtime(os.path.dirname(os.path.dirname(a.paths[0])))
  b = sources.folder_source(str(archive), "test", str(cache), progress=False)
  assert b.paths == a.paths
  assert os.path.getmtime(os.path.dirname(os.path.dirname(b.paths[0]))) == mtime
  assert not [n for n in os.listdir(cache) if ".tmp" in n]


def test_views_and_random_resized_crops_keep_masks_aligned(tmp_path):
  image = np.random.default_rng(0).integers(0, 255, (60, 80, 3)).astype(np.uint8)
  view = transforms.view(image, transforms.ViewSpec(32, 40))
  assert view.shape == (32, 32, 3)
  mask = np.random.default_rng(1).random((32, 32)) < 0.1
  for seed in range(6):
    crop, crop_mask = transforms.random_resized_crop(np.random.default_rng(seed), view, 24, mask)
    rng = np.random.default_rng(seed)
    top, left, h, w = transforms.crop_box(rng, 32, 32)
    mirror = rng.random() < 0.5
    flip = (lambda a: a[:, ::-1]) if mirror else (lambda a: a)
    np.testing.assert_array_equal(crop, flip(transforms._resize(
        view[top:top + h, left:left + w], 24, 24)))
    np.testing.assert_array_equal(crop_mask, flip(transforms._resize(
        mask[top:top + h, left:left + w], 24, 24, nearest=True)))
  with pytest.raises(ValueError, match="vary in size"):
    feed = loader.Feed(sources.FileSource.from_folder(str(_folder(tmp_path)), "train"),
                       lambda x: x.astype(np.float32))
    feed.batch(np.arange(3))


def test_every_source_follows_the_protocol_and_any_source_caches_in_memory(tmp_path):
  _write_folder(tmp_path, sizes=((20, 20),) * 3)
  files = sources.FileSource.from_folder(str(tmp_path), "test")
  held = sources.cache(files, "test")
  for src in (files, held, loader.Subset(files, [4, 1])):
    assert isinstance(src, sources.Source)
  assert held.in_memory and held.class_names == files.class_names
  images, labels = files.gather(np.arange(len(files)))
  np.testing.assert_array_equal(held.images, images)
  np.testing.assert_array_equal(held.labels, labels)
  assert [held.example_id(i) for i in range(6)] == [files.example_id(i) for i in range(6)]
  np.testing.assert_array_equal(loader.Subset(files, [4, 1]).gather(np.array([1]))[0],
                                images[[1]])


def test_streamed_splits_have_no_whole_split_arrays(tmp_path):
  from overinterp_jax import data as data_lib
  from overinterp_jax.data import normalize
  _write_folder(tmp_path, sizes=((16, 16),) * 3)
  src = sources.FileSource.from_folder(str(tmp_path), "test")
  streamed = data_lib.Dataset(src, src, normalize.IMAGENET, transforms.ViewSpec(16, 16))
  assert not streamed.in_memory and streamed.num_examples("train") == 6
  with pytest.raises(TypeError, match="feed"):
    streamed.test_images  # pylint: disable=pointless-statement
  held = data_lib.Dataset(sources.cache(src, "train"), sources.cache(src, "test"),
                          normalize.IMAGENET, transforms.ViewSpec(16, 16))
  assert held.in_memory and held.test_labels.tolist() == src.labels.tolist()


def _folder(tmp_path):
  root = tmp_path / "imgs"
  _write_folder(root)
  return root


def test_train_plan_gives_each_process_its_share_of_every_global_batch(monkeypatch):
  plans, valid = loader.eval_plan(10, 4)
  assert [len(p) for p in plans] == [4, 4, 4] and valid[-1].tolist() == [1, 1, 0, 0]
  full = loader.train_plan(3, 1, 100, 8)
  assert len(full) == 12 and all(len(b) == 8 for b in full)
  assert len(set(np.concatenate(full).tolist())) == 96
  for pid in (0, 1):
    monkeypatch.setattr(sharding.jax, "process_count", lambda: 2)
    monkeypatch.setattr(sharding.jax, "process_index", lambda pid=pid: pid)
    mine = loader.train_plan(3, 1, 100, 8)
    for b, m in zip(full, mine):
      np.testing.assert_array_equal(m, b[pid * 4:(pid + 1) * 4])


def test_grain_workers_give_the_same_batches_as_this_process(tmp_path):
  root = tmp_path / "same"
  _write_folder(root, sizes=((20, 24),) * 3, modes=("RGB", "L", "RGB"))
  src = sources.FileSource.from_folder(str(root), "train")
  prepare = lambda x: x.astype(np.float32) / 255
  base = loader.Feed(src, prepare, view=transforms.ViewSpec(16, 18), train_crop=True, seed=4)
  plan = loader.train_plan(0, 2, len(src), 2)
  inline = [base.batch(p, 2) for p in plan]
  for workers in (0, 2):
    got = list(loader.Feed(src, prepare, view=base.view, train_crop=True, seed=4,
                           workers=workers).batches(plan, 2))
    assert len(got) == len(inline)
    for (x, y), (x0, y0) in zip(got, inline):
      np.testing.assert_array_equal(x, x0)
      np.testing.assert_array_equal(y, y0)
  # Another epoch crops differently; the in-memory path equals the file path.
  assert not np.array_equal(base.batch(plan[0], 3)[0], inline[0][0])
  images = np.stack([transforms.view(src[i][0], base.view) for i in range(len(src))])
  arrays = loader.Feed(sources.ArraySource(images, src.labels, src.class_names), prepare)
  files = loader.Feed(src, prepare, view=base.view)
  np.testing.assert_array_equal(arrays.batch(np.arange(6))[0], files.batch(np.arange(6))[0])


@pytest.mark.parametrize("d,per_step", [(16, 1), (16, 4), (70000, 100)])
def test_record_shards_round_trip(tmp_path, d, per_step):
  rng = np.random.default_rng(d)
  n = 3
  order = np.stack([rng.permutation(d) for _ in range(n)]).astype(np.int32)
  steps = -(-d // per_step)
  values = np.repeat(rng.random((n, steps)).astype(np.float32), per_step, axis=1)[:, :d]
  rec = record_shards.encode(order, values, np.arange(n), rng.random(n), ["a", "b", "c"],
                             per_step)
  assert rec["rank"].dtype == (np.uint16 if d > 256 else np.uint8) or d > 65536
  if d > record_shards.MAX_RANKS:
    assert rec["rank"].dtype == np.uint16 and rec["step_values"].dtype == np.float16
  assert record_shards.shard_check(n, d, per_step)(rec) is None
  back = record_shards.decode(rec, per_step)
  if record_shards.rank_unit(d, per_step) == 1:
    np.testing.assert_array_equal(back["order"], order)
    np.testing.assert_array_equal(back["values"], values)
  else:  # steps only: the same features in each step, values to float16 precision
    for i in range(n):
      for s in (0, steps - 1):
        sl = slice(s * per_step, (s + 1) * per_step)
        assert set(back["order"][i, sl]) == set(order[i, sl])
    np.testing.assert_allclose(back["values"], values, rtol=1e-3)
  path = str(tmp_path / "s.npz")
  from overinterp_jax.store import npz
  npz.save(path, rec, "fp")
  recs = record_shards.RecordSet([(path, "fp", slice(0, n))], d, per_step)
  rows = recs.rows(np.array([2, 0]))
  np.testing.assert_array_equal(rows["order"], back["order"][[2, 0]])
  assert list(rows["ids"]) == ["c", "a"]
  np.testing.assert_array_equal(recs.small()["max_values"],
                                rec["step_values"].astype(np.float32).max(1))


def test_streaming_dataset_reads_a_folder_on_demand(tmp_path):
  from configs import cifar10
  from overinterp_jax import data as data_lib
  root = tmp_path / "stream"
  _write_folder(root)
  cfg = cifar10.get_config().data
  cfg.update({"source": "image_folder", "path": str(root), "in_memory": False,
              "view_size": 16, "view_resize": 20, "expected_train": 6, "expected_test": 6,
              "normalization": "imagenet"})
  ds = data_lib.load_for_config(cfg, str(tmp_path / "work"))
  assert not ds.in_memory and ds.image_shape == (16, 16, 3) and ds.num_examples("test") == 6
  x, y = ds.feed("test").batch(np.array([5, 0]))
  assert x.shape == (2, 16, 16, 3) and x.dtype == np.float32 and y.tolist() == [1, 0]
  expected = ds.prepare(transforms.view(ds.test[5][0], transforms.ViewSpec(16, 20)))
  np.testing.assert_array_equal(x[0], expected)
  cfg.expected_test = 7
  with pytest.raises(ValueError, match="expected_test"):
    data_lib.load_for_config(cfg, str(tmp_path / "work"))


def test_tfds_source_decodes_jpeg_bytes_and_keys_by_file_name(tmp_path, monkeypatch):
  """TFDS itself needs TensorFlow to build test data, so ``tfds.data_source`` is replaced by
  what it returns with ``SkipDecoding``: feature dicts holding the encoded image."""
  import tensorflow_datasets as tfds
  from overinterp_jax.data import tfds_source
  (tmp_path / "cifar10").mkdir()
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 255, (8, 8, 3)).astype(np.uint8) for _ in range(3)]
  encoded = []
  for im in images:
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, format="PNG")
    encoded.append({"image": buf.getvalue(), "label": 2, "id": b"x",
                    "file_name": f"train_{len(encoded)}.png".encode()})
  calls = []
  def data_source(name, split, data_dir, download, decoders):
    assert download is False and "image" in decoders
    calls.append((name, split))
    return encoded
  monkeypatch.setattr(tfds, "data_source", data_source)
  monkeypatch.setattr(tfds_source, "class_names", lambda name, data_dir: ("a", "b", "c"))
  src = sources.TfdsSource("cifar10", "train", str(tmp_path))
  assert len(src) == 3 and calls == [("cifar10", "train")]
  image, label = src[1]
  np.testing.assert_array_equal(image, images[1])
  assert label == 2 and src.example_id(2) == "train_2.png"
  assert src.labels.tolist() == [2, 2, 2]
  clone = pickle.loads(pickle.dumps(src))  # grain workers reopen the source
  assert clone._source is None
  np.testing.assert_array_equal(clone[0][0], images[0])


def test_tfds_source_keys_cifar10_by_its_id(tmp_path):
  """Files written by TFDS's own writer (tests/tfds_data.py): CIFAR-10 records have no
  ``file_name``; each example is keyed by the dataset's ``id`` (``train_00004``)."""
  from tfds_data import write_cifar10
  made = write_cifar10(tmp_path, num_train=4, num_test=3)
  src = sources.TfdsSource("cifar10", "train", str(tmp_path))
  ids = [src.example_id(i) for i in range(len(src))]
  assert sorted(ids) == sorted(made["train"])
  for i, key in enumerate(ids):
    np.testing.assert_array_equal(src[i][0], made["train"][key][0])


_WORKERS_RUN = """
import json, sys
import numpy as np
from overinterp_jax import data as data_lib
from overinterp_jax.config_schema import base_config
c = base_config().data
c.update({"source": "tfds", "name": "cifar10", "data_dir": sys.argv[1], "in_memory": False})
feed = data_lib.load_for_config(c, sys.argv[2], progress=False, workers=1).feed("train")
print(json.dumps([y.tolist() for _, y in feed.batches([np.arange(3), np.arange(3, 6)])]))
"""


def test_grain_workers_on_tfds_leave_no_shared_memory_at_exit(tmp_path):
  """Batches from worker processes arrive in shared memory: a run that exits while it still
  holds some must not leave them behind (``resource_tracker: ... leaked shared_memory``)."""
  import json
  import subprocess
  import sys
  from tfds_data import write_cifar10
  made = write_cifar10(tmp_path / "tfds", num_train=6, num_test=2)
  run = subprocess.run([sys.executable, "-c", _WORKERS_RUN, str(tmp_path / "tfds"),
                        str(tmp_path / "work")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0, run.stderr
  labels = sum(json.loads(run.stdout.strip().splitlines()[-1]), [])
  assert sorted(labels) == sorted(label for _, label in made["train"].values())
  assert "leaked shared_memory" not in run.stderr, run.stderr


@pytest.mark.parametrize("in_memory", [True, False])
def test_folder_splits_name_the_sub_folders_read_as_train_and_test(tmp_path, in_memory):
  from overinterp_jax import data as data_lib
  from overinterp_jax.config_schema import base_config
  root = tmp_path / "ilsvrc"
  _write_folder(root, sizes=((12, 12),) * 3, modes=("RGB", "L", "RGB"))
  os.rename(root / "test", root / "val")  # the ILSVRC layout: train/ and val/
  c = base_config().data
  c.path, c.in_memory, c.normalization = str(root), in_memory, "imagenet"
  with pytest.raises(ValueError, match="test"):  # the default ("train", "test") is missing
    data_lib.load_for_config(c, str(tmp_path / "w0"), progress=False)
  c.folder_splits = ("train", "val")
  c.expected_train, c.expected_test = 6, 6
  ds = data_lib.load_for_config(c, str(tmp_path / "w1"), progress=False)
  assert ds.num_examples("train") == ds.num_examples("test") == 6
  c.folder_splits = ("val", "val")  # one folder as both splits (the ImageNet sample)
  ds = data_lib.load_for_config(c, str(tmp_path / "w2"), progress=False)
  np.testing.assert_array_equal(ds.feed("train").images(np.arange(6)),
                                ds.feed("test").images(np.arange(6)))
