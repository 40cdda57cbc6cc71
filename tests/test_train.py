"""Training and the main CLI on the smoke config (synthetic data, tiny CNN)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from config_perturb import perturbed_config
from configs import smoke
from overinterp_jax import data as data_lib
from overinterp_jax.data import augment
from overinterp_jax import config_reads, cpu_budget, sharding, train
from overinterp_jax.pipeline import trained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, workdir):
  return subprocess.run(
      [sys.executable, "-m", "overinterp_jax.main", "--config=configs/smoke.py",
       f"--workdir={workdir}", *args],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("arg,closest", [
    ("--config.train.num_epoch=3", "config.train.num_epochs"),
    ("--config.sis.patch=3", "config.sis.patch_size"),
    ("--config.nonexistent=1", "config."),
])
def test_main_rejects_unknown_config_key_in_one_line(tmp_path, arg, closest):
  proc = run_main(arg, workdir=tmp_path)
  assert proc.returncode != 0
  key = arg[2:].split("=")[0]
  assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr  # one line
  assert f"Unknown config key {key}" in proc.stderr and closest in proc.stderr
  assert not tmp_path.exists() or not os.listdir(tmp_path)


def test_main_rejects_bad_values_before_work(tmp_path):
  proc = run_main("--config.train.num_epochs=0", workdir=tmp_path)
  assert proc.returncode != 0
  assert "config.train.num_epochs" in proc.stderr
  assert not (tmp_path / "base_model").exists()


def test_main_rejects_negative_host_devices(tmp_path):
  proc = run_main("--config.runtime.host_devices=-1", workdir=tmp_path)
  assert proc.returncode != 0
  assert "config.runtime.host_devices" in proc.stderr


def test_main_splits_the_host_into_host_devices(tmp_path):
  """The subprocess starts with JAX's single CPU device; the config asks for two."""
  proc = run_main("--config.runtime.host_devices=2", "--config.stages=('train',)",
                  "--config.train.num_epochs=1", workdir=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  devices_line = next(l for l in proc.stderr.splitlines() if "Devices:" in l)
  assert devices_line.count("CpuDevice") == 2, devices_line
  assert (tmp_path / "base_model" / "metrics.jsonl").exists()


def _smoke_data(tmp_path):
  config = smoke.get_config()
  return config, data_lib.load_for_config(config.data, str(tmp_path))


def _train(config, ds, workdir, **kw):
  kw.setdefault("augment_fn", augment.augment_images)
  return train.fit(config, str(workdir), ds.feed("train"), ds.feed("test"), **kw)


@pytest.mark.parametrize("overrides", [
    {},
    # killed after the low-resolution epoch, which trains at twice the batch
    {"train.progressive_resizing": ((0.5, 0.34, 2),)},
    {"train.augment.flip": "alternating", "train.augment.padding": 2, "train.eval_every": 2},
], ids=["full_size", "progressive", "alternating_flip"])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, overrides):
  config, ds = _smoke_data(tmp_path)
  config.train.num_epochs = 3
  config.update_from_flattened_dict(overrides)
  kw = dict(augment_fn=train.config_augment_fn(config))
  full_state, full_metrics = _train(config, ds, tmp_path / "full", **kw)
  _train(config, ds, tmp_path / "resumed", max_epochs_this_run=1, **kw)
  assert len(train.read_metrics(str(tmp_path / "resumed" / "metrics.jsonl"))) == 1
  resumed_state, resumed_metrics = _train(config, ds, tmp_path / "resumed", **kw)
  for a, b in zip(jax.tree.leaves(full_state.params), jax.tree.leaves(resumed_state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed_metrics == full_metrics
  records = train.read_metrics(str(tmp_path / "resumed" / "metrics.jsonl"))
  assert [m["epoch"] for m in records] == [1, 2, 3]
  progressive = "train.progressive_resizing" in overrides
  assert [m["train_height_width"] for m in records] == (
      [[8, 8], [16, 16], [16, 16]] if progressive else [[16, 16]] * 3)
  assert [m["batch_size"] for m in records] == [64, 32, 32] if progressive else [32] * 3
  evaluated = [m["test_accuracy"] is not None for m in records]
  assert evaluated == ([False, True, True] if "train.eval_every" in overrides else [True] * 3)
  assert records[-1]["test_accuracy"] == full_metrics["accuracy"]


def test_run_killed_mid_epoch_resumes_at_its_batch_with_the_same_batches(tmp_path):
  """Checkpoints every 3 steps carry the loader's position: a run stopped after 11 steps
  (8 per epoch at batch 32: epoch 1, then 3 batches of epoch 2) resumes at batch 3 of
  epoch 2, not at the epoch's start, and ends bitwise equal to a run never stopped."""
  config, ds = _smoke_data(tmp_path)
  config.train.num_epochs = 2
  config.runtime.checkpoint_every_steps = 3
  config.train.augment.flip, config.train.augment.padding = "alternating", 2
  kw = dict(augment_fn=train.config_augment_fn(config))
  full_state, full_metrics = train.fit(config, str(tmp_path / "full"), ds.feed("train"),
                                       ds.feed("test"), **kw)
  train.fit(config, str(tmp_path / "cut"), ds.feed("train"), ds.feed("test"),
            max_steps_this_run=11, **kw)
  assert train.read_metrics(str(tmp_path / "cut" / "metrics.jsonl"))[0]["epoch"] == 1
  seen = []
  feed = ds.feed("train")
  real = feed.batches
  feed.batches = lambda plan, *a, **k: seen.append(len(plan)) or real(plan, *a, **k)
  resumed_state, resumed_metrics = train.fit(config, str(tmp_path / "cut"), feed,
                                             ds.feed("test"), **kw)
  assert seen == [5]  # epoch 2's batches 3..7
  for a, b in zip(jax.tree.leaves(full_state.params), jax.tree.leaves(resumed_state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert resumed_metrics == full_metrics
  full = train.read_metrics(str(tmp_path / "full" / "metrics.jsonl"))
  cut = train.read_metrics(str(tmp_path / "cut" / "metrics.jsonl"))
  assert [r["train_loss"] for r in cut] == [r["train_loss"] for r in full]


def test_alternating_flip_mirrors_training_images_on_the_host(tmp_path):
  """With a crop-only augmentation, only the host's mirroring tells the two runs apart."""
  config, ds = _smoke_data(tmp_path)
  config.train.num_epochs = 1
  config.train.augment.flip = "alternating"
  crop_only = train.config_augment_fn(config)
  assert crop_only.keywords == {"padding": 4, "flip": False}
  alternating, _ = _train(config, ds, tmp_path / "alternating", augment_fn=crop_only)
  config.train.augment.flip = "random"  # with a crop-only augment_fn: never mirrored
  unflipped, _ = _train(config, ds, tmp_path / "unflipped", augment_fn=crop_only)
  assert not np.array_equal(np.asarray(jax.tree.leaves(alternating.params)[0]),
                            np.asarray(jax.tree.leaves(unflipped.params)[0]))


def assert_same_updates(init, a, b, rtol=0.05):
  """``a`` and ``b`` (parameter trees after training from ``init``) made the same updates:
  per leaf, ``max |Δa − Δb| <= rtol · max |Δa|``. Scaled to each leaf's update, not to its
  values: summation order (1 vs 4 devices, one CPU vs another) moves a float32 result by a
  few ulps, which two steps through batch norm amplify to ~1% of an update on some CPUs,
  while a genuinely different step (other batch, other learning rate) changes it by ~10-100%.
  """
  for (path, p0), pa, pb in zip(jax.tree_util.tree_flatten_with_path(init)[0],
                                jax.tree.leaves(a), jax.tree.leaves(b)):
    da, db = np.asarray(pa) - np.asarray(p0), np.asarray(pb) - np.asarray(p0)
    scale = np.abs(da).max()
    assert np.abs(da - db).max() <= rtol * scale, (
        f"{jax.tree_util.keystr(path)}: updates differ by {np.abs(da - db).max():.3g}, "
        f"more than {rtol} × their largest {scale:.3g}")


def test_train_step_same_loss_on_one_and_four_devices(tmp_path, devices):
  config, ds = _smoke_data(tmp_path)
  model = train.create_model("resnet20", num_classes=10)
  key = jax.random.key(0)

  def two_steps(mesh, rows, steps=None):
    x, y = ds.prepare(ds.train_images[rows]), ds.train_labels[rows]
    tx = train.make_optimizer(config, steps_per_epoch=8)
    state = train.create_train_state(model, tx, x.shape[1:], jax.random.key(1))
    init = jax.device_get(state.params)
    state = jax.device_put(state, sharding.replicated(mesh))
    steps = steps or train.compile_steps(mesh, augment.augment_images)
    state, m1 = steps.train(state, x, y, key)
    state, m2 = steps.train(state, x, y, key)
    return (float(m1["loss"]), float(m2["loss"])), init, jax.device_get(state.params), steps

  (a1, a2), init, pa, _ = two_steps(sharding.data_mesh(devices[:1]), slice(0, 32))
  (b1, b2), _, pb, four = two_steps(sharding.data_mesh(devices), slice(0, 32))
  assert a1 == pytest.approx(b1, rel=1e-5) and a2 == pytest.approx(b2, rel=1e-5)
  assert_same_updates(init, pa, pb)
  # The same comparison tells a genuinely different step apart: another batch of 32.
  _, _, pc, _ = two_steps(sharding.data_mesh(devices), slice(32, 64), four)
  with pytest.raises(AssertionError, match="updates differ"):
    assert_same_updates(init, pa, pc)


def test_schedules():
  config = smoke.get_config()
  config.train.num_epochs = 200
  config.train.schedule = "multistep"
  config.train.lr = 0.1
  lr = train.learning_rate_schedule(config, steps_per_epoch=10)
  assert float(lr(0)) == pytest.approx(0.1)
  assert float(lr(600)) == pytest.approx(0.02)
  assert float(lr(1600)) == pytest.approx(0.1 * 0.2 ** 3)
  config.train.schedule = "onecycle"
  lr = train.learning_rate_schedule(config, steps_per_epoch=10)
  assert float(lr(int(2000 * config.train.warmup_fraction))) == pytest.approx(0.1, rel=1e-3)
  config.train.schedule = "nope"
  with pytest.raises(ValueError, match="config.train.schedule"):
    train.learning_rate_schedule(config, steps_per_epoch=10)


@pytest.mark.parametrize("schedule", ["onecycle", "multistep"])
def test_schedule_with_larger_low_resolution_batches_keeps_the_rate_per_image(schedule):
  """An epoch at m× the batch takes 1/m of the steps; its step t has m× the base
  rate at base step m·t, so the rate per image follows the base schedule."""
  config = smoke.get_config()
  config.train.num_epochs, config.train.schedule, config.train.lr = 10, schedule, 0.1
  config.train.lr_milestones = (1, 3, 5)
  base = train.learning_rate_schedule(config, steps_per_epoch=40)
  config.train.progressive_resizing = ((0.5, 0.2, 4), (0.75, 0.2, 2))
  assert cpu_budget.epoch_batch_multipliers(config) == [4, 4, 2, 2] + [1] * 6
  lr = train.learning_rate_schedule(config, steps_per_epoch=40)
  # Real steps per epoch: 10, 10, 20, 20, then 40.
  for real, base_step, m in [(0, 0, 4), (7, 28, 4), (10, 40, 4), (19, 76, 4), (20, 80, 2),
                             (45, 130, 2), (60, 160, 1), (299, 399, 1)]:
    assert float(lr(real)) == pytest.approx(m * float(base(base_step)), rel=1e-6), real


def test_progressive_resizing_epochs_and_errors():
  config = smoke.get_config()
  config.train.num_epochs = 27
  assert cpu_budget.epoch_scales(config) == [1.0] * 27
  config.train.progressive_resizing = ((0.5, 0.25), (0.75, 0.25))
  assert cpu_budget.epoch_scales(config) == [0.5] * 7 + [0.75] * 7 + [1.0] * 13
  assert cpu_budget.epoch_batch_multipliers(config) == [1] * 27
  config.train.progressive_resizing = ((0.5, 0.25, 4), (0.75, 0.25))
  assert cpu_budget.epoch_scales(config) == [0.5] * 7 + [0.75] * 7 + [1.0] * 13
  assert cpu_budget.epoch_batch_multipliers(config) == [4] * 7 + [1] * 20
  assert cpu_budget.scaled_height_width((32, 32), 0.75) == (24, 24)
  for bad, match in [(((0.5, 0.5), (0.75, 0.5)), "sum to < 1"), (((1.5, 0.2),), r"\(0, 1\]"),
                     (((0.5, 0.0),), "fraction > 0"), (((0.5,),), "scale, fraction"),
                     (((0.5, 0.2, 0),), "integer >= 1"), (((0.5, 0.2, 1.5),), "integer >= 1")]:
    config.train.progressive_resizing = bad
    with pytest.raises(ValueError, match=match):
      cpu_budget.epoch_scales(config)


def test_main_rejects_bad_progressive_resizing_before_work(tmp_path):
  proc = run_main("--config.train.progressive_resizing=((0.5, 1.0),)", workdir=tmp_path)
  assert proc.returncode != 0
  assert "config.train.progressive_resizing" in proc.stderr and "sum to < 1" in proc.stderr
  assert not (tmp_path / "base_model").exists()


def test_every_key_training_reads_keys_the_model_and_no_other(tmp_path):
  """A trained model is reused only for a config with the same values at every path its
  training read (summary.json); changing any of them, or the data, retrains."""
  config, ds = _smoke_data(tmp_path)
  config.train.num_epochs = 1
  view = config_reads.recording_view(config)
  with config_reads.recording() as reads:  # as Context.train_model: augmentation read inside
    _ensure(view, ds, tmp_path / "m", augment_fn=train.config_augment_fn(view), reads=reads)
  summary = trained.load_summary(config, str(tmp_path / "m"), "data")
  paths = summary["config_reads"]
  for path in ("model.name", "train.lr", "train.seed", "train.num_epochs", "train.batch_size",
               "train.augment.padding", "train.augment.flip", "model.bn_momentum",
               "model.precision", "train.progressive_resizing"):
    assert path in paths, path
  assert not [p for p in paths if p.startswith(("runtime", "sis", "controls", "subsets"))]
  for path in paths:
    changed = perturbed_config(config, path)
    assert trained.load_summary(changed, str(tmp_path / "m"), "data") is None, path
  assert trained.load_summary(config, str(tmp_path / "m"), "other data") is None
  unread = perturbed_config(config, "sis.threshold")
  assert trained.load_summary(unread, str(tmp_path / "m"), "data") == summary
  # A model from before train.augment.padding existed: reused at the key's default only.
  old = {k: v for k, v in summary.items()}
  old["config_reads"] = [p for p in paths if p != "train.augment.padding"]
  old["config_known"] = [p for p in old["config_known"] if p != "train.augment.padding"]
  old["fingerprint"] = trained.model_key(config, "data", old["config_reads"])
  (tmp_path / "m" / "summary.json").write_text(json.dumps(old))
  assert trained.load_summary(config, str(tmp_path / "m"), "data") is not None
  config.train.augment.padding = 2
  assert trained.load_summary(config, str(tmp_path / "m"), "data") is None


def test_bn_momentum_errors_name_the_key(tmp_path):
  config = smoke.get_config()  # cnn3: no batch norm
  config.model.bn_momentum = 0.99
  with pytest.raises(ValueError, match=r"config.model.bn_momentum=0.99: model 'cnn3' has no batch"):
    train.build_model(config)
  config.model.name = "resnet20"
  assert train.build_model(config).bn_momentum == 0.99
  config.model.bn_momentum = 1.0
  with pytest.raises(ValueError, match=r"config.model.bn_momentum must be in \[0, 1\)"):
    train.build_model(config)
  proc = run_main("--config.model.bn_momentum=0.99", workdir=tmp_path)  # before any work
  assert proc.returncode != 0 and "has no batch norm" in proc.stderr
  assert not (tmp_path / "base_model").exists()


def test_models_with_random_streams_train(tmp_path):
  """Input dropout (train and eval) and dropout layers get their PRNG streams."""
  config, ds = _smoke_data(tmp_path)
  config.train.num_epochs = 1
  config.model.input_keep_prob = 0.8
  state, metrics = _train(config, ds, tmp_path / "input_dropout")
  assert metrics["count"] == 64 and np.isfinite(metrics["loss"])
  # Evaluation uses a fixed input-dropout key: deterministic.
  steps = train.compile_steps(sharding.data_mesh())
  x, y = ds.prepare(ds.test_images[:8]), ds.test_labels[:8]
  valid = np.ones(8, bool)
  assert (jax.device_get(steps.eval(state, x, y, valid))
          == jax.device_get(steps.eval(state, x, y, valid)))

  from overinterp_jax.models import WideResNet
  model = WideResNet(depth=10, widen_factor=1, dropout_rate=0.3, num_classes=10)
  tx = train.make_optimizer(config, steps_per_epoch=4)
  state = train.create_train_state(model, tx, x.shape[1:], jax.random.key(0))
  _, a = train.train_step(state, x, y, jax.random.key(1))
  _, b = train.train_step(state, x, y, jax.random.key(2))
  assert float(a["loss"]) != float(b["loss"])  # different dropout draws


def test_bad_input_dropout_value_is_named():
  config = smoke.get_config()
  config.model.input_keep_prob = 0.0
  with pytest.raises(ValueError, match="config.model.input_keep_prob"):
    train.build_model(config)


def _ensure(config, ds, workdir, data_fp="data", **kw):
  kw.setdefault("augment_fn", augment.augment_images)
  return trained.ensure_trained(config, str(workdir), ds.feed("train"), ds.feed("test"),
                                data_fp=data_fp, **kw)


def test_a_model_directory_of_another_config_is_never_resumed(tmp_path):
  config, ds = _smoke_data(tmp_path)
  config.train.num_epochs = 2
  other = trained.variant(config, {"train.seed": 1})
  _ensure(config, ds, tmp_path / "m")
  with pytest.raises(ValueError, match="another config"):
    _ensure(other, ds, tmp_path / "m")
  # A killed run of the first config: one epoch's checkpoint, no summary.
  _ensure(other, ds, tmp_path / "m", replace_stale=True)
  killed = tmp_path / "killed"
  _train(config, ds, killed, max_epochs_this_run=1)
  with pytest.raises(ValueError, match="another config"):  # unknown origin
    _ensure(other, ds, killed)
  replaced = _ensure(other, ds, killed, replace_stale=True)
  fresh = _ensure(other, ds, tmp_path / "fresh")
  for a, b in zip(jax.tree.leaves(replaced.variables), jax.tree.leaves(fresh.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Its own killed run resumes.
  _train(other, ds, tmp_path / "own", max_epochs_this_run=1)
  (tmp_path / "own" / "fingerprint.json").write_text(
      (tmp_path / "fresh" / "fingerprint.json").read_text())
  first_epoch = (tmp_path / "own" / "metrics.jsonl").read_text()  # has wall times
  resumed = _ensure(other, ds, tmp_path / "own")
  assert (tmp_path / "own" / "metrics.jsonl").read_text().startswith(first_epoch)
  for a, b in zip(jax.tree.leaves(resumed.variables), jax.tree.leaves(fresh.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_low_resolution_batch_larger_than_the_data_is_named(tmp_path):
  config, ds = _smoke_data(tmp_path)
  config.train.progressive_resizing = ((0.5, 0.5, 16),)  # 32 × 16 > 256 training images
  with pytest.raises(ValueError,
                     match=r"× 16 in config.train.progressive_resizing\) exceeds the 256"):
    _train(config, ds, tmp_path / "too_big")
