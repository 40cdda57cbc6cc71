"""Fault injection: a damaged, wrong or non-finite input is named and recomputed (or stops the
run before any work), never trusted.

1. a corrupt model checkpoint is named and the model retrained;
2. deleted or damaged outputs behind a finished stage's marker are recomputed;
3. values that used to fail late fail before any work and leave no files;
4. a non-finite or exploding training loss stops training, naming epoch, step and lr;
5. a data load that fails its checks writes nothing;
6. a second run on a directory in use stops; a holder killed with -9 frees it;
7. a resumed stage lists the files an uninterrupted one lists; a writer killed with -9
   leaves no temporary file behind once the directory is written again.
"""
import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import smoke
from overinterp_jax import data as data_lib
from overinterp_jax.data import augment, loader
from overinterp_jax import main, train
from overinterp_jax.pipeline import trained
from overinterp_jax.store import atomic, locks
from smoke_pipeline import REPO, command, env, outputs, run_main
from test_data import encode, make_tar, make_tree, pixel_pattern

pytestmark = pytest.mark.usefixtures("fast_compile")


def flip_bytes(path, every=8000, count=8, start=100):
  """Inverts ``count`` bytes every ``every`` bytes of ``path`` (size unchanged)."""
  data = bytearray(open(path, "rb").read())
  for i in range(start, len(data), every):
    data[i:i + count] = bytes(b ^ 0xFF for b in data[i:i + count])
  with open(path, "wb") as fh:
    fh.write(bytes(data))


def largest_checkpoint_file(model_dir, step):
  return max(glob.glob(f"{model_dir}/checkpoints/{step}/**/d/*", recursive=True),
             key=os.path.getsize)


def copy_of(workdir, tmp_path):
  shutil.copytree(workdir, tmp_path / "w")
  return tmp_path / "w"


# ------------------------------------------------------------------ 1. corrupt checkpoints


def _smoke(tmp_path, **train_overrides):
  config = smoke.get_config()
  config.train.update(train_overrides)
  return config, data_lib.load_for_config(config.data, str(tmp_path))


def _ensure(config, ds, workdir):
  return trained.ensure_trained(config, str(workdir), ds.feed("train"), ds.feed("test"),
                                augment_fn=augment.augment_images, data_fp="data")


def _errors(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("num_epochs", [1, 2], ids=["no_earlier_checkpoint", "earlier_kept"])
def test_a_corrupt_checkpoint_is_named_and_the_model_retrained(tmp_path, caplog, num_epochs):
  config, ds = _smoke(tmp_path, num_epochs=num_epochs)
  model = tmp_path / "model"
  first = _ensure(config, ds, model)
  flip_bytes(largest_checkpoint_file(model, num_epochs))
  caplog.clear()
  with caplog.at_level(logging.INFO):
    again = _ensure(config, ds, model)
  errors = _errors(caplog)
  where = str(model / "checkpoints" / str(num_epochs))
  assert any(e.startswith(f"Checkpoint {where} ") and ("corrupt" in e or "cannot be read" in e)
             for e in errors), errors
  assert any(f"Deleted checkpoint {where}" in e for e in errors), errors
  retrained = [m for m in caplog.messages if f"{model}: epoch" in m]
  assert retrained == [m for m in retrained if f"epoch {num_epochs}/" in m] and retrained
  # Training is deterministic: the retrained model is the one that was lost.
  for a, b in zip(jax.tree.leaves(first.variables), jax.tree.leaves(again.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert again.metrics == first.metrics
  caplog.clear()
  with caplog.at_level(logging.INFO):
    _ensure(config, ds, model)  # now intact: restored without a word
  assert not _errors(caplog) and not [m for m in caplog.messages if f"{model}: epoch" in m]


def test_corrupt_checkpoint_checksums_are_not_trusted(tmp_path, caplog):
  config, ds = _smoke(tmp_path, num_epochs=1)
  model = tmp_path / "model"
  _ensure(config, ds, model)
  (model / "checkpoint_sha256" / "1.json").write_text("{torn")
  with caplog.at_level(logging.INFO):
    _ensure(config, ds, model)
  assert any("checksums" in e and "cannot be read" in e for e in _errors(caplog))


def test_a_corrupt_base_model_in_a_finished_run_is_retrained(finished, tmp_path):
  """The issue's case: 8 bytes flipped every 8,000 in the base model's data file after the
  run finished. The train stage's marker no longer matches, the checkpoint fails its
  checksums, the last epoch is retrained and the report is what it was."""
  workdir = copy_of(finished, tmp_path)
  flip_bytes(largest_checkpoint_file(workdir / "base_model", 2))
  proc = run_main(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Stage train: base_model/checkpoints/2/" in proc.stderr
  assert f"Checkpoint {workdir}/base_model/checkpoints/2 " in proc.stderr
  assert f"{workdir}/base_model: epoch 2/2" in proc.stderr
  assert proc.stderr.count("already done") == 6
  assert outputs(workdir) == outputs(finished)


# ------------------------------------------------------------ 2. outputs behind a marker


def test_damaged_outputs_of_finished_stages_are_recomputed(finished, tmp_path):
  workdir = copy_of(finished, tmp_path)
  (workdir / "report.md").unlink()
  shard = workdir / "backselect" / "train" / "shard_00001.npz"
  os.truncate(shard, shard.stat().st_size // 2)
  records = workdir / "sis" / "single.npz"
  flip_bytes(records, every=10**9, start=records.stat().st_size // 2)
  proc = run_main(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for stage, problem in (("backselect", "backselect/train/shard_00001.npz has"),
                         ("sis", "sis/single.npz changed"), ("report", "report.md is missing")):
    assert f"Stage {stage}: {problem}" in proc.stderr, stage
    assert f"Stage {stage}: running." in proc.stderr
  assert "backselect train (mean): 1 of 2 shards to compute." in proc.stderr
  assert proc.stderr.count("already done") == 4  # train, subsets, retrain, controls
  assert outputs(workdir) == outputs(finished)
  assert run_main(workdir).stderr.count("already done") == 7


# ------------------------------------------------------------------ 3. late-failing values


@pytest.mark.parametrize("key,value,message", [
    ("sis.patch_size", 3, r"config\.sis\.patch_size=3 must divide the image size 16x16"),
    ("train.schedule", "linear", r"config\.train\.schedule must be one of"),
    ("model.num_classes", 5, r"config\.model\.num_classes=5, but the data has 10 classes"),
    ("train.batch_size", 300, r"config\.train\.batch_size=300 \(× 1 in "
                              r"config\.train\.progressive_resizing\) exceeds the 256 training "
                              r"examples"),
    ("train.batch_size", 30, r"config\.train\.batch_size=30 must be divisible by the 4 devices"),
    ("train.lr_milestones", (5, 2), r"config\.train\.lr_milestones"),
    ("train.warmup_fraction", 1.0, r"config\.train\.warmup_fraction"),
    ("train.momentum", 1.0, r"config\.train\.momentum"),
    ("sis.ensemble_epochs", -1, r"config\.sis\.ensemble_epochs"),
    ("controls.blur_sigma", 0.0, r"config\.controls\.blur_sigma"),
    ("report.num_figure_images", 0, r"config\.report\.num_figure_images"),
    ("data.normalization", "zscore", r"config\.data\.normalization"),
])
def test_bad_values_fail_before_any_work_and_leave_no_files(tmp_path, monkeypatch, key, value,
                                                           message):
  config = smoke.get_config()
  section, _, leaf = key.rpartition(".")
  (config[section] if section else config)[leaf] = value
  monkeypatch.setattr(main.runner, "run_pipeline", lambda *a: pytest.fail("work started"))
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=message):
    main.run(config, str(workdir))
  assert not workdir.exists()


def test_a_late_value_fails_on_the_command_line_before_any_work(tmp_path):
  proc = run_main(tmp_path / "run", "--config.sis.patch_size=3")
  assert proc.returncode != 0
  assert "config.sis.patch_size=3 must divide the image size 16x16" in proc.stderr
  assert "Stage" not in proc.stderr
  assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------- 4. non-finite loss


def test_a_non_finite_loss_stops_training_naming_epoch_and_step(tmp_path):
  config, ds = _smoke(tmp_path, num_epochs=2)
  workdir = str(tmp_path / "model")
  train.fit(config, workdir, ds.feed("train"), ds.feed("test"), max_epochs_this_run=1)
  calls = []

  def nan_at_third_batch(images):
    calls.append(1)
    x = ds.prepare(images)
    return np.full_like(x, np.nan) if len(calls) == 3 else x

  with pytest.raises(FloatingPointError,
                     match=r"the loss is nan at epoch 2, step 3 of 8; the checkpoint of epoch 1 "
                           r"is kept"):
    train.fit(config, workdir, loader.Feed(ds.source("train"), nan_at_third_batch),
              loader.Feed(ds.source("test"), nan_at_third_batch))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1"]
  assert [r["epoch"] for r in train.read_metrics(os.path.join(workdir, "metrics.jsonl"))] == [1]
  # The kept checkpoint is intact: training resumes from it and finishes.
  _, metrics = train.fit(config, workdir, ds.feed("train"), ds.feed("test"))
  assert np.isfinite(metrics["loss"])


def test_an_exploding_loss_stops_training_naming_the_learning_rate(tmp_path):
  """The ImageNet smoke model's loss went 8 -> 94,832 and the run went on to report
  accuracies: a loss far above where it started stops the run, naming config.train.lr."""
  config, ds = _smoke(tmp_path, num_epochs=1, lr=50.0, schedule="cosine")
  workdir = str(tmp_path / "absurd")
  with pytest.raises(FloatingPointError,
                     match=r"the loss diverged\. Its mean over steps 2-\d of 8 in epoch 1 is "
                           r".*more than 10 × 2\.3.*lower config\.train\.lr=50 "):
    train.fit(config, workdir, ds.feed("train"), ds.feed("test"))
  assert not train.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  sane, _ = _smoke(tmp_path, num_epochs=1)  # the smoke recipe's lr 0.05 trains
  _, metrics = train.fit(sane, str(tmp_path / "sane"), ds.feed("train"), ds.feed("test"))
  assert np.isfinite(metrics["loss"])
  record, = train.read_metrics(str(tmp_path / "sane" / "metrics.jsonl"))
  assert record["initial_loss"] == pytest.approx(np.log(10), rel=0.2)


def test_the_loss_limit_is_relative_to_the_first_step_or_chance():
  guard = train.LossGuard("w", num_classes=10, factor=10.0, lr=0.1,
                          schedule=lambda step: 0.1 / (1 + step))
  guard.check([30.0], 1, 1, 8, 1)  # a model starting high: its first loss is the reference
  assert guard.initial == 30.0
  guard.check([299.0, 1.0], 2, 1, 8, 3)  # mean 150 < 10 × 30
  with pytest.raises(FloatingPointError,
                     match=r"is 301, more than 10 × 30 .*config\.train\.lr=0\.1 "
                           r"\(the learning rate at this step: 0\.025\)"):
    guard.check([301.0], 4, 1, 8, 4)
  resumed = train.LossGuard("w", 10, 10.0, 0.1, lambda step: 0.1, initial=None)
  with pytest.raises(FloatingPointError, match=r"more than 10 × 2\.303"):
    resumed.check([25.0], 5, 2, 8, 13)  # no first step known: chance level, ln 10
  train.LossGuard("w", 10, 0.0, 0.1, lambda step: 0.1).check([1e30], 1, 1, 8, 1)  # 0: off
  with pytest.raises(FloatingPointError, match=r"the loss is inf at epoch 1, step 6 of 8"):
    guard.check([1.0, np.inf], 5, 1, 8, 6)
  with pytest.raises(FloatingPointError, match=r"steps 5-6 of 8 in epoch 1 is 400, then nan "
                                               r"at step 7, more than 10 × 30"):
    guard.check([400.0, 400.0, np.nan], 5, 1, 8, 7)  # exploded, then overflowed


# ------------------------------------------------------------------ 5. failed data loads


def _image_folder_config(path, cache_dir=""):
  config = smoke.get_config()
  config.data.source = "image_folder"
  config.data.path = str(path)
  config.data.cache_dir = cache_dir
  return config


def test_a_data_load_that_fails_its_checks_writes_nothing(tmp_path):
  root = str(tmp_path / "folder")
  make_tree(root)
  os.makedirs(os.path.join(root, "test", "bee"))  # a class the train split lacks
  with open(os.path.join(root, "test", "bee", "0.png"), "wb") as fh:
    fh.write(encode(pixel_pattern("test", "bee", 0), "PNG"))
  tar = make_tar(str(tmp_path / "data.tar.gz"), root)
  for source in (root, tar):
    workdir = tmp_path / f"run_{os.path.basename(source)}"
    with pytest.raises(ValueError, match="different classes"):
      main.run(_image_folder_config(source), str(workdir))
    assert not workdir.exists()  # neither data_cache/*.npz nor config.json


def test_a_split_failing_its_counts_writes_no_cache_of_the_others(tmp_path):
  root = str(tmp_path / "folder")
  make_tree(root)
  config = _image_folder_config(root, cache_dir=str(tmp_path / "cache"))
  config.data.expected_test = 4  # train (5 images, unchecked) passes, test (3) does not
  with pytest.raises(ValueError, match="split 'test' .* has 3 images, expected 4"):
    main.run(config, str(tmp_path / "run"))
  assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


# ------------------------------------------------------- 6. two runs on one directory


def test_a_second_run_on_a_directory_in_use_stops_and_a_killed_holder_frees_it(
    tmp_path, monkeypatch):
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; from overinterp_jax.store import locks\n"
      "with locks.workdir_lock(sys.argv[1]):\n"
      "  print('held', flush=True); time.sleep(600)\n"), str(workdir)],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    monkeypatch.setattr(main.runner, "run_pipeline", lambda *a: pytest.fail("work started"))
    with pytest.raises(RuntimeError, match=rf"in use by another run \(pid {holder.pid},"):
      main.run(smoke.get_config(), str(workdir))
    assert not (workdir / "config.json").exists()
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  monkeypatch.setattr(main.runner, "run_pipeline", lambda *a: {"train": {}})
  assert main.run(smoke.get_config(), str(workdir)) == {"train": {}}  # kill -9 freed it
  assert (workdir / "config.json").exists()


# ------------------------------------------- 7. resumed stages and killed writers


def test_a_restored_model_notes_the_files_a_trained_one_notes(tmp_path):
  """A stage's marker lists the files it produced; a model restored by a resumed stage must
  list what training it listed (fingerprint.json and metrics.jsonl were dropped: four
  entries of results.json lost after a resumed sis stage with two models)."""
  config, ds = _smoke(tmp_path, num_epochs=1)
  model = tmp_path / "model"
  with atomic.recording() as trained_now:
    _ensure(config, ds, model)
  with atomic.recording() as restored:
    _ensure(config, ds, model)
  described = [atomic.describe_files(str(tmp_path), files) for files in (trained_now,
                                                                         restored)]
  assert described[0] == described[1]
  assert {"model/fingerprint.json", "model/metrics.jsonl"} <= set(described[1])


def _killed_writer(path):
  """Kills (-9) a process inside ``atomic.write_atomic(path, ...)``, its temporary file
  created and still empty; returns the temporary file's path."""
  writer = subprocess.Popen([sys.executable, "-c", (
      "import sys, time; from overinterp_jax.store import atomic\n"
      "atomic.write_atomic(sys.argv[1], lambda fh: print('writing', flush=True) or "
      "time.sleep(600), binary=True)\n"), str(path)], stdout=subprocess.PIPE, text=True)
  try:
    assert writer.stdout.readline().strip() == "writing"
  finally:
    writer.send_signal(signal.SIGKILL)
    writer.wait()
  tmp, = glob.glob(f"{path}.*.tmp")
  assert os.path.getsize(tmp) == 0 and not os.path.exists(path)
  return tmp


def test_a_killed_writers_tmp_file_is_deleted_by_the_next_write(tmp_path):
  tmp = _killed_writer(tmp_path / "figure.png")
  busy = tmp_path / f"other.png.{os.getppid()}.{atomic._HOST_TAG}.0123abcd.tmp"
  busy.write_bytes(b"")  # a live process's (this one's parent): never touched
  atomic.write_atomic(str(tmp_path / "report.md"), lambda fh: fh.write("done"))
  assert not os.path.exists(tmp) and busy.exists()
  assert sorted(os.listdir(tmp_path)) == sorted(["report.md", busy.name])


def _manifests(workdir):
  """``{stage: files its marker lists}`` from results.json, less the names of orbax's data
  files (random per save)."""
  results = json.loads((workdir / "results.json").read_text())
  return {stage: sorted(f for f in summary["outputs"]
                        if not re.search(r"/checkpoints/\d+/default/", f))
          for stage, summary in results.items()}


@pytest.mark.slow
def test_kill_9_in_sis_and_report_then_resume_keeps_every_manifest_entry(finished, tmp_path):
  """Killed (-9) in stage sis after two of its models were trained, then a writer of the
  report's figures killed mid-write: the resumed run lists every file the uninterrupted one
  lists, writes the same report, and leaves no temporary file."""
  proc = subprocess.Popen(command(tmp_path), cwd=REPO, env=env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 900
  while (not glob.glob(str(tmp_path / "sis" / "input_dropout.parts" / "part_*"))
         and proc.poll() is None and time.time() < deadline):
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before stage sis wrote its last model's parts"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  _killed_writer(tmp_path / "figures" / "confidence_rise.png")
  again = run_main(tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert _manifests(tmp_path) == _manifests(finished)
  assert outputs(tmp_path) == outputs(finished)
  assert not [f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".tmp")]
