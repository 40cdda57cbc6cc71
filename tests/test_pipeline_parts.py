"""Pipeline building blocks: validated array files, masked images, controls' helpers, config checks."""
import os
import types

import jax
import numpy as np
import pytest

from configs import cifar10, smoke
from overinterp_jax import data as data_lib
from overinterp_jax import main
from overinterp_jax import sis
from overinterp_jax.data import loader
from overinterp_jax.pipeline import (backselect_stage, context, controls, masked_data,
                                     record_shards, report_sections, retrain_stage, sis_sample,
                                     sis_stage, sis_stats, trained)
from overinterp_jax.store import hashing, npz


# ----------------------------------------------------------------------------- store

def test_artifact_round_trip_and_rejections(tmp_path):
  path = str(tmp_path / "a.npz")
  arrays = {"x": np.arange(6).reshape(2, 3), "y": np.ones(2, np.float32)}
  npz.save(path, arrays, "fp1")
  got = npz.load(path, "fp1")
  assert set(got) == {"x", "y"} and np.array_equal(got["x"], arrays["x"])
  assert npz.load(path, "other") is None                       # other config
  assert npz.load(path, "fp1", lambda a: "too short") is None  # caller's check
  assert npz.load(str(tmp_path / "missing.npz"), "fp1") is None
  data = open(path, "rb").read()
  with open(path, "wb") as fh:                                       # truncated
    fh.write(data[:len(data) // 2])
  assert npz.load(path, "fp1") is None
  assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
  with pytest.raises(ValueError, match="reserved"):
    npz.save(path, {"__checksum__": np.zeros(1)}, "fp1")


def test_checksum_catches_silent_corruption(tmp_path):
  path = str(tmp_path / "a.npz")
  npz.save(path, {"x": np.zeros(4)}, "fp")
  with np.load(path) as f:
    stored = {k: f[k] for k in f.files}
  stored["x"] = np.ones(4)  # a file rewritten with other values but the old checksum
  np.savez(path, **stored)
  assert npz.load(path, "fp") is None


def test_fingerprint_is_stable_and_sensitive():
  c = cifar10.get_config()
  assert hashing.fingerprint(c.sis) == hashing.fingerprint(cifar10.get_config().sis)
  c.sis.threshold = 0.9
  assert hashing.fingerprint(c.sis) != hashing.fingerprint(cifar10.get_config().sis)


# ------------------------------------------------------------------ backselect shards

def _linear_model(d, k=3, seed=0):
  w = np.random.default_rng(seed).normal(size=(d * 3, k)).astype(np.float32)
  return lambda params, x: x.reshape(x.shape[0], -1) @ params, w


def test_backselect_shards_resume_and_recompute_only_bad_ones(tmp_path, monkeypatch):
  apply, w = _linear_model(16)
  images = np.random.default_rng(1).integers(0, 255, (10, 4, 4, 3)).astype(np.uint8)
  prepare = lambda x: x.astype(np.float32) / 255 - 0.5
  feed = loader.array_feed(images, np.zeros(10, np.int32), prepare)
  cfg = cifar10.get_config().backselect
  cfg.method, cfg.remove_per_step, cfg.shard_size = "gradient", 2, 4
  first = backselect_stage.backselect_split(str(tmp_path), apply, w, feed, cfg, "fp",
                                            seed=0, progress=False)
  assert len(first) == 10 and first.num_features == 16
  assert sorted(os.listdir(tmp_path)) == ["shard_00000.npz", "shard_00001.npz",
                                          "shard_00002.npz"]
  # The records equal one in-memory selection of each shard's images.
  direct = backselect_stage.run_backselect(apply, w, prepare(images[4:8]), cfg, seed=4)
  rows = first.rows(np.arange(4, 8))
  np.testing.assert_array_equal(rows["order"], direct.order)
  np.testing.assert_array_equal(rows["values"], direct.values)
  assert list(rows["ids"]) == [f"data/{i}" for i in range(4, 8)]
  calls = []
  real = backselect_stage.run_backselect
  monkeypatch.setattr(backselect_stage, "run_backselect",
                      lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
  (tmp_path / "shard_00001.npz").write_bytes(b"garbage")
  again = backselect_stage.backselect_split(str(tmp_path), apply, w, feed, cfg, "fp",
                                            seed=0, progress=False)
  assert calls == [4]  # only the bad shard
  for k, v in first.everything().items():
    np.testing.assert_array_equal(v, again.everything()[k])
  backselect_stage.backselect_split(str(tmp_path), apply, w, feed, cfg, "fp2",
                                    seed=0, progress=False)
  assert calls == [4, 4, 4, 2]  # another config recomputes everything


def test_shard_check_rejects_non_permutations():
  check = record_shards.shard_check(1, 3, 1)
  good = {"rank": np.array([[2, 0, 1]], np.uint8), "step_values": np.zeros((1, 3)),
          "targets": np.zeros(1), "original_scores": np.zeros(1), "ids": np.array(["a"])}
  assert check(good) is None
  assert "permutation" in check({**good, "rank": np.array([[0, 0, 1]])})
  assert "step_values" in check({**good, "step_values": np.zeros((1, 2))})
  assert "non-finite" in check({**good, "step_values": np.array([[0, np.nan, 0]])})


class _SisContext:
  """The part of ``Context`` that ``sis_stage.exact_records`` and the SIS sample use."""

  def __init__(self, workdir, images, images_per_call):
    self.workdir, self.height_width, self.mesh = str(workdir), images.shape[1:3], None
    self.progress = False
    self.config = smoke.get_config()
    self.config.sis.patch_size, self.config.sis.images_per_call = 1, images_per_call
    self.images = images
    self.data = type("D", (), {"num_examples": staticmethod(lambda split: len(images))})
    self.compiled_predict, self.fitted_batches = {}, {}
    self.sis_sample = sis_sample.SisSample(self, sis_stage.selection_records)

  predict_logits = context.Context.predict_logits

  def feed(self, split):
    return loader.array_feed(self.images, np.zeros(len(self.images), np.int32),
                             lambda x: x.astype(np.float32) / 255)

  def path(self, *parts):
    return os.path.join(self.workdir, *parts)

  def labels(self, split):
    return np.zeros(len(self.images), np.int32)

  def fully_masked(self, split, kind, indices=None):
    return None


def test_exact_sis_records_resume_per_call_after_a_kill(tmp_path, monkeypatch):
  apply, w = _linear_model(9)
  images = np.random.default_rng(2).integers(0, 255, (5, 3, 3, 3)).astype(np.uint8)
  ctx = _SisContext(tmp_path, images, images_per_call=2)
  indices = np.arange(5)
  first = sis_stage.exact_records(ctx, "single", apply, w, "fp", indices)
  assert first["order"].shape == (5, 9)
  assert os.listdir(tmp_path / "sis") == ["single.npz"]  # parts removed once merged

  real, calls = sis.batched_backselect, []
  def killed_after_two(*a, **k):
    if len(calls) == 2:
      raise KeyboardInterrupt("killed")
    calls.append(len(a[1]))
    return real(*a, **k)
  monkeypatch.setattr(sis, "batched_backselect", killed_after_two)
  with pytest.raises(KeyboardInterrupt):
    sis_stage.exact_records(ctx, "other", apply, w, "fp", indices)
  assert sorted(os.listdir(tmp_path / "sis" / "other.parts")) == ["part_00000.npz",
                                                                  "part_00002.npz"]
  (tmp_path / "sis" / "other.parts" / "part_00000.npz").write_bytes(b"torn")
  calls.clear()
  monkeypatch.setattr(sis, "batched_backselect", lambda *a, **k: calls.append(len(a[1])) or
                      real(*a, **k))
  again = sis_stage.exact_records(ctx, "other", apply, w, "fp", indices)
  assert calls == [2, 1]  # the torn part and the missing last one; part 2 is reused
  for k in first:
    np.testing.assert_array_equal(first[k], again[k])


def test_test_samples_are_seeded_random_and_nested(tmp_path):
  """Image folders are ordered by class: a control on "the first N images" would see only
  the first classes. Samples are seeded, spread over the split, and nested."""
  ctx = _SisContext(tmp_path, np.zeros((100, 2, 2, 3), np.uint8), images_per_call=1)
  sample = ctx.sis_sample
  small, large = sample.test_sample(10), sample.test_sample(40)
  assert len(small) == 10 and np.all(np.diff(small) > 0) and small.max() >= 50
  assert set(small) <= set(large)
  np.testing.assert_array_equal(small, sample.test_sample(10))
  np.testing.assert_array_equal(sample.test_sample(0), np.arange(100))
  np.testing.assert_array_equal(sample.indices(), sample.test_sample(ctx.config.sis.num_images))


# ------------------------------------------------------------------------ masked images

def test_augmenting_the_subset_image_equals_augmenting_image_and_mask_together():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (6, 8, 8, 3)).astype(np.uint8)
  masks = rng.random((6, 8, 8)) < 0.1
  prepare = lambda x: x.astype(np.float32) / 127.5 - 1
  subset = loader.array_feed(images, np.zeros(6, np.int32), prepare).with_masks(
      loader.PackedMasks.from_masks(masks))
  key = jax.random.key(3)
  aug_subset, _ = data_lib.augment_batch(key, subset.batch(np.arange(6))[0])
  aug_x, aug_m = data_lib.augment_batch(key, prepare(images), masks)
  expected = np.where(np.asarray(aug_m)[..., None], np.asarray(aug_x), 0)
  np.testing.assert_array_equal(np.asarray(aug_subset), expected)


def test_masked_feed_views():
  images = np.full((2, 2, 2, 3), 200, np.uint8)
  masks = np.array([[[True, False], [False, False]]] * 2)
  feed = loader.array_feed(images, np.zeros(2, np.int32), lambda x: x.astype(np.float32))
  packed = loader.PackedMasks.from_masks(masks)
  x = feed.with_masks(packed).batch(np.arange(2))[0]
  assert x.shape == (2, 2, 2, 3) and x[0, 0, 0, 0] == 200 and x[0, 0, 1, 0] == 0
  only = feed.with_masks(packed, mask_only=True).batch(np.array([1]))[0]
  np.testing.assert_array_equal(only[0, ..., 0], masks[1].astype(np.float32))
  fill = lambda idx: np.full((len(idx),) + images.shape[1:], -7, np.float32)
  y = feed.with_masks(packed, fill=fill).batch(np.array([0]))[0]
  assert y[0, 1, 1, 2] == -7


def test_dilate():
  m = np.zeros((1, 5, 5), bool)
  m[0, 0, 0] = m[0, 3, 3] = True
  d = masked_data.dilate(m, 3)
  assert d.sum() == 4 + 9
  assert d[0, 1, 1] and d[0, 4, 4] and not d[0, 0, 3]
  assert np.array_equal(masked_data.dilate(m, 1), m)
  with pytest.raises(ValueError, match="odd"):
    masked_data.dilate(m, 2)


def test_masking_values_are_deterministic_and_keyed_by_image_index():
  x = np.random.default_rng(0).normal(size=(4, 8, 8, 3)).astype(np.float32)
  assert masked_data.fully_masked_values("mean", x) is None
  blur = masked_data.fully_masked_values("blur", x, blur_sigma=1.0)
  assert blur.shape == x.shape and blur.std() < x.std()
  a = masked_data.fully_masked_values("noise", x, seed=1)
  np.testing.assert_array_equal(a, masked_data.fully_masked_values("noise", x, seed=1))
  b = masked_data.fully_masked_values("noise", x[2:3], seed=1, indices=np.array([2]))
  np.testing.assert_array_equal(a[2:3], b)
  assert np.abs(a).max() <= 1.0
  with pytest.raises(ValueError, match="masking value"):
    masked_data.fully_masked_values("purple", x)


def test_packed_masks_round_trip_in_memory_and_memory_mapped(tmp_path):
  m = np.random.default_rng(0).random((3, 32, 30)) < 0.05
  packed = loader.PackedMasks.from_masks(m)
  np.testing.assert_array_equal(packed[np.arange(3)], m)
  np.save(tmp_path / "m.npy", packed.packed)
  mapped = loader.PackedMasks(str(tmp_path / "m.npy"), 30)
  np.testing.assert_array_equal(mapped[np.array([2, 0])], m[[2, 0]])
  import pickle
  again = pickle.loads(pickle.dumps(mapped))  # grain workers reopen the file
  assert again._packed is None
  np.testing.assert_array_equal(again[np.array([1])], m[[1]])


# ----------------------------------------------------------------------------- controls

def test_wrong_targets_never_hit_the_prediction():
  pred = np.random.default_rng(0).integers(0, 10, 1000)
  wrong = controls.wrong_targets(pred, 10, seed=5)
  assert not np.any(wrong == pred) and set(wrong) == set(range(10))
  np.testing.assert_array_equal(wrong, controls.wrong_targets(pred, 10, seed=5))


def test_rise_fraction():
  values = np.array([[0.5, 0.7, 0.2], [0.4, 0.3, 0.1], [0.905, 0.1, 0.0]])
  out = controls.rise_fraction(values.max(axis=1), np.array([0.6, 0.5, 0.9]))
  assert out["fraction_rising"] == pytest.approx(2 / 3)
  assert out["fraction_rising_by_0.01"] == pytest.approx(1 / 3)


def test_sis_table_shows_one_dash_for_an_empty_iqr():
  no_sis = sis_stats.size_stats(np.array([10, 20]), np.array([False, False]), 256)
  table = report_sections.sis_table({"models": {"single": {"test_accuracy": 0.5, **no_sis}}})
  assert table.splitlines()[-1] == "| single | 50.00 | — | — | 0 | 0.00 | — | — | — | — |"


# --------------------------------------------------------------------- config checking

@pytest.mark.parametrize("key,value,message", [
    ("subsets.frac_kept", 0.0, "config.subsets.frac_kept"),
    ("subsets.frac_kept", 1.5, "config.subsets.frac_kept"),
    ("sis.threshold", 0.0, "config.sis.threshold"),
    ("sis.threshold", 1.01, "config.sis.threshold"),
    ("backselect.method", "magic", "config.backselect.method"),
    ("backselect.remove_per_step", 0, "config.backselect.remove_per_step"),
    ("retrain.kinds", ("bs", "nope"), "config.retrain.kinds"),
    ("sis.models", ("single", "committee"), "config.sis.models"),
    ("controls.masking_values", ("mean", "purple"), "config.controls.masking_values"),
    ("controls.dilation", 2, "config.controls.dilation"),
    ("stages", ("train", "dance"), "config.stages"),
    ("sis.images_per_call", -1, "config.sis.images_per_call"),
    ("train.augment.flip", "sometimes", "config.train.augment.flip"),
    ("train.augment.padding", -1, "config.train.augment.padding"),
    ("runtime.host_devices", -1, "config.runtime.host_devices"),
    ("train.eval_every", 0, "config.train.eval_every"),
    ("sis.min_confidence", 1.5, "config.sis.min_confidence"),
    ("model.pretrained", "resnet99_mnist", "config.model.pretrained"),
])
def test_bad_config_values_are_named(key, value, message):
  config = smoke.get_config()
  section, _, leaf = key.rpartition(".")
  target = config[section] if section else config
  target[leaf] = value
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    main.validate_config(config)


def test_missing_data_is_named(tmp_path):
  config = cifar10.get_config()
  config.data.source = "image_folder"
  config.data.path = str(tmp_path / "nowhere.tar.gz")
  with pytest.raises(ValueError, match=r"config\.data\.path"):
    main.validate_config(config)


def test_retraining_on_subsets_is_at_full_resolution():
  """Resizing a subset image would blend its kept pixels with masked ones."""
  config = smoke.get_config()
  config.train.progressive_resizing = ((0.5, 0.25),)
  config.retrain.num_epochs = 3
  retrain = retrain_stage.retrain_config(types.SimpleNamespace(config=config))
  assert retrain.train.progressive_resizing == () and retrain.train.num_epochs == 3
  assert config.train.progressive_resizing == ((0.5, 0.25),)  # the base model's own config


def test_shipped_configs_validate():
  from configs import cifar10_cpu
  for config in (cifar10.get_config(), cifar10_cpu.get_config(), smoke.get_config(),
                 cifar10_cpu.get_config("analyze"), cifar10_cpu.get_config("mitigations")):
    main.validate_config(config)
  with pytest.raises(ValueError, match="Unknown variant 'fast'.*analyze"):
    cifar10_cpu.get_config("fast")


def test_sis_sample_can_be_restricted_to_confident_images(tmp_path, monkeypatch):
  ctx = _SisContext(tmp_path, np.zeros((100, 2, 2, 3), np.uint8), images_per_call=1)
  confidence = np.linspace(0, 1, 100)
  predicted = np.arange(100) % 2  # right on the even images only (labels are 0)
  sample = ctx.sis_sample
  monkeypatch.setattr(sample, "base_predictions", lambda: (predicted, confidence))
  ctx.config.sis.num_images, ctx.config.sis.min_confidence = 6, 0.9
  picked = sample.indices()
  assert len(picked) == 6 and np.all(np.diff(picked) > 0) and np.all(confidence[picked] >= 0.9)
  order = sample.test_sample_order()  # the first 6 eligible of the seeded permutation
  np.testing.assert_array_equal(picked, np.sort(order[confidence[order] >= 0.9][:6]))
  ctx.config.sis.only_correct = True  # and right: the even ones of the 10 images >= 0.9
  picked = sample.indices()
  np.testing.assert_array_equal(picked, [90, 92, 94, 96, 98])
  ctx.config.sis.num_images = 0  # 0: every qualifying image
  np.testing.assert_array_equal(sample.indices(), [90, 92, 94, 96, 98])
  ctx.config.sis.num_images, ctx.config.sis.only_correct = 6, False
  ctx.config.sis.min_confidence = 0.0  # 0: any image, as before
  np.testing.assert_array_equal(sample.indices(), sample.test_sample(6))


def test_gradient_vs_exact_control_on_a_linear_model(tmp_path, monkeypatch):
  """A model linear in its inputs (a logit difference for 2 classes): the gradient ranks
  single removals exactly as their effects, and the control says so."""
  import types
  from overinterp_jax.pipeline import gradient_check
  rng = np.random.default_rng(4)
  w = (0.1 * rng.normal(size=(4 * 4 * 3, 2))).astype(np.float32)  # far from saturation
  apply = lambda params, x: x.reshape(x.shape[0], -1) @ params
  images = rng.integers(0, 255, (6, 4, 4, 3)).astype(np.uint8)
  ctx = _SisContext(tmp_path, images, images_per_call=3)
  ctx.base = types.SimpleNamespace(apply=apply, variables=w)
  ctx.base_fp = "linear"
  ctx.config.sis.patch_size, ctx.config.sis.num_images = 1, 6
  ctx.config.subsets.frac_kept = 0.25
  monkeypatch.setattr(ctx.sis_sample, "records", lambda name: sis_stage.exact_records(
      ctx, name, apply, w, "linear", np.arange(6)))
  out = gradient_check.run(ctx)
  assert out["num_images"] == 6 and out["num_features"] == 16 and out["kept_features"] == 4
  # Log-softmax of 2 linear logits is concave, not linear: the ranks still agree closely.
  assert out["first_step_spearman_median"] > 0.9
  x = ctx.feed("test").batch(np.arange(6))[0]
  exact = gradient_check.single_removal_order(ctx, x, np.argmax(apply(w, x), 1), None, 16)
  for i in range(6):  # by hand: each pixel's removal effect on the target log-probability
    t = int(np.argmax(apply(w, x[i:i + 1])))
    scores = []
    for j in range(16):
      xm = x[i].copy()
      xm.reshape(16, 3)[j] = 0
      z = apply(w, xm[None])[0]
      scores.append(z[t] - np.logaddexp(z[0], z[1]))
    np.testing.assert_array_equal(exact[i], np.argsort(-np.array(scores), kind="stable"))
  for key in ("exact", "gradient", "random"):
    assert 0 <= out[key]["mean_confidence"] <= 1


def test_an_ensemble_of_a_base_on_one_device_and_members_on_the_mesh():
  """A base model loaded on one device (``model.weights``) and members trained replicated
  over the mesh: their variables stack (this failed with "incompatible devices") and the
  ensemble's logits are the members' mean."""
  from overinterp_jax import sharding
  mesh = sharding.data_mesh()
  rng = np.random.default_rng(0)
  w = [rng.normal(size=(12, 3)).astype(np.float32) for _ in range(3)]
  placed = [jax.device_put(w[0], jax.devices()[0])] + [
      jax.device_put(x, sharding.replicated(mesh)) for x in w[1:]]
  members = [trained.Trained(None, {"params": {"w": v}}, {}, 0.0) for v in placed]
  stacked = trained.stack_variables(members)
  np.testing.assert_array_equal(stacked["params"]["w"], np.stack(w))
  apply = lambda v, x: x.reshape(x.shape[0], -1) @ v["params"]["w"]
  x = rng.normal(size=(8, 2, 2, 3)).astype(np.float32)
  logits = trained.predict_logits(trained.ensemble_apply(apply), stacked, x, batch_size=8,
                                  mesh=mesh)
  expected = np.mean([x.reshape(8, -1) @ m for m in w], axis=0)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
