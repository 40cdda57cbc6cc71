"""The pipeline end to end on the smoke config: every stage, the report, kill -9 and resume."""
import json
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from overinterp_jax import train
from smoke_pipeline import REPO, FIGURES, command, env, outputs, run_main


def test_report_has_every_section_and_figure(finished):
  md = (finished / "report.md").read_text()
  for heading in ("## Table 1: pixel-subset retraining", "## SIS size at τ = 0.4",
                  "### Smoothed SIS (dilated by 3×3)", "### Targeted SIS (random wrong class)",
                  "### Masking value", "### Confidence along backward selection", "## Figures"):
    assert heading in md, heading
  assert "5% BS mask only" in md
  header = next(line for line in md.splitlines() if line.startswith("| model | seed |"))
  cells = header.strip("|").split(" | ")
  assert len(set(cells)) == len(cells), header  # base and retrain budgets are both 2 epochs
  assert "—–—" not in md
  assert "`true class → predicted class confidence`" in md  # explains sis_examples.png
  report = json.loads((finished / "report.json").read_text())
  t1 = report["table1"]
  assert t1["model"] == "cnn3"
  for key in ("full", "full_same_budget", "bs", "random", "mask_only"):
    assert 0.0 <= t1[key] <= 1.0, key
  assert t1["frac_kept"] == 0.05 and not any("pct" in key for key in t1)
  stages = report["stages"]
  assert set(stages["sis"]["models"]) == {"single", "ensemble", "input_dropout"}
  assert stages["subsets"]["pixels_kept"] == 13  # ceil(0.05 · 256)
  assert set(stages["controls"]["masking_values"]) == {"mean", "blur", "noise"}
  assert stages["backselect"]["train"]["count"] == 256
  assert stages["backselect"]["test"]["count"] == 64
  # Timings live in timings.json only: the report must not depend on them.
  assert "seconds" not in json.dumps(report)
  timings = json.loads((finished / "timings.json").read_text())
  assert set(timings) == {"train", "backselect", "subsets", "retrain", "sis", "controls",
                          "report"}
  for f in FIGURES:
    assert (finished / "figures" / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert len(list((finished / "backselect" / "train").glob("shard_*.npz"))) == 2


def test_smoke_run_prints_its_own_lines_only(finished_run):
  workdir, proc = finished_run
  lines = (proc.stdout + proc.stderr).splitlines()
  assert len(lines) <= 60, "\n".join(lines)
  assert not [l for l in lines if "orbax" in l or "Unable to initialize backend" in l]
  assert "exact SIS (" not in proc.stderr  # config.runtime.progress=False: no progress bars
  assert proc.stdout.splitlines()[0] == f"Done: 7 stages. Results in {workdir}/report.md"
  assert proc.stdout.splitlines()[1].startswith("Test accuracy (%): full images (2 ep) ")
  assert len(proc.stdout.splitlines()) == 2  # a summary, not the whole results


def test_rerun_skips_finished_stages(finished):
  before = outputs(finished)
  proc = run_main(finished)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count("already done") == 7
  assert outputs(finished) == before
  assert len(train.read_metrics(str(finished / "base_model" / "metrics.jsonl"))) == 2


@pytest.mark.slow
def test_kill_9_mid_backselect_then_resume_gives_identical_report(finished, tmp_path):
  shard = tmp_path / "backselect" / "train" / "shard_00000.npz"
  proc = subprocess.Popen(command(tmp_path), cwd=REPO, env=env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while not shard.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before its first backselect shard was written"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (tmp_path / "stages" / "report.json").exists()
  # A torn temporary file from the killed run must not be trusted.
  (tmp_path / "backselect" / "train" / "shard_00001.npz").write_bytes(b"PK\x03\x04 torn")
  again = run_main(tmp_path)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Ignoring" in again.stderr  # the torn shard was rejected and recomputed
  assert outputs(tmp_path) == outputs(finished)


def test_bad_values_fail_before_work(tmp_path):
  proc = run_main(tmp_path, "--config.subsets.frac_kept=0.0")
  assert proc.returncode != 0
  assert "config.subsets.frac_kept" in proc.stderr
  assert not (tmp_path / "base_model").exists()


def test_collect_builds_one_table_from_workdirs(finished, tmp_path):
  from overinterp_jax import collect
  table = collect.collect([str(finished), str(finished)])
  assert table.splitlines()[0].startswith("| model | seed | full images |")
  assert "| cnn3 | 0 |" in table and "mean of 2" in table
  with pytest.raises(FileNotFoundError, match="report.json"):
    collect.collect([str(tmp_path)])


def test_collect_heads_columns_with_the_fraction_and_rejects_old_keys(tmp_path):
  """report.json's table1 keys name the retrain models ("bs", not "bs_5pct" at any fraction);
  collect heads its columns with the reports' subsets.frac_kept."""
  from overinterp_jax import collect
  row = {"model": "cnn3", "seed": 0, "frac_kept": 0.1, "full": 0.9, "full_same_budget": 0.8,
         "bs": 0.5, "random": 0.25, "mask_only": 0.4, "bs_minus_random": 0.25}
  for name, t1 in (("new", row), ("old", {**row, "bs_5pct": 0.5})):
    (tmp_path / name).mkdir()
    (tmp_path / name / "report.json").write_text(json.dumps({"table1": t1}))
  header = collect.collect([str(tmp_path / "new")]).splitlines()[0]
  assert "| 10% BS | 10% random |" in header and "5%" not in header
  with pytest.raises(ValueError, match=r"bs_5pct.*stages/report\.json"):
    collect.collect([str(tmp_path / "old")])


@pytest.mark.slow
def test_streamed_image_folder_gives_the_in_memory_report(tmp_path):
  """Every stage on an image folder read file by file (``data.in_memory=False``: lazy
  decoding, records read shard by shard, masks memory-mapped) reports exactly what the
  same folder decoded into memory reports."""
  from PIL import Image
  from overinterp_jax.data import synthetic
  splits = synthetic.make_synthetic(256, 64, image_size=16, num_classes=10, seed=0)
  root = tmp_path / "folder"
  for split, data in splits.items():
    for i, (image, label) in enumerate(zip(data.images, data.labels)):
      path = root / split / data.class_names[label] / f"{i:04d}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(image).save(path)
  common = ("--config.data.source=image_folder", f"--config.data.path={root}",
            "--config.data.expected_train=256", "--config.data.expected_test=64")
  runs = {}
  for name, extra in (("memory", ()), ("stream", ("--config.data.in_memory=False",
                                                   "--config.data.view_size=16",
                                                   "--config.runtime.data_workers=0"))):
    proc = run_main(tmp_path / name, *common, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs[name] = outputs(tmp_path / name)
  # Only streamed data is brought to a view, and its report says which (here the identity).
  view = '; view "sizes": Resize(16), CenterCrop(16) (long side rounded, crop offset floored)'
  assert view.encode() in runs["stream"]["report.md"]
  runs["stream"]["report.md"] = runs["stream"]["report.md"].replace(view.encode(), b"", 1)
  assert runs["stream"] == runs["memory"]


def test_changing_frac_kept_recomputes_every_stage_that_reads_it(finished, tmp_path):
  """subsets.frac_kept is read by subsets, retrain (through the masks), controls (the
  masking-value control's BS subsets) and report (its headings): they rerun (and the stages
  after subsets, a linear chain), the report names the configured fraction, and nothing
  that does not depend on it is recomputed. (It once reported stale controls.)"""
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  proc = run_main(workdir, "--config.subsets.frac_kept=0.1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for stage in ("train", "backselect"):
    assert f"Stage {stage}: already done." in proc.stderr, stage
  for stage in ("subsets", "retrain", "sis", "controls", "report"):
    assert f"Stage {stage}: running." in proc.stderr, stage
  # Models and SIS records that do not depend on the subsets are reused, not recomputed.
  for model in ("base_model", "retrain_full", "ensemble_member_1", "input_dropout_model"):
    assert f"{model}: epoch" not in proc.stderr, model
  for model in ("retrain_bs", "retrain_random", "retrain_mask_only"):
    assert f"{model}: epoch 2/2" in proc.stderr, model
  assert "Exact backward selection" not in proc.stderr
  md = (workdir / "report.md").read_text()
  assert not re.search(r"(?<![\d.])5%", md)  # no "5%" label left (a "95% CI" is fine)
  assert "10% BS" in md and "base on own 10% BS test subsets" in md
  report = json.loads((workdir / "report.json").read_text())
  assert report["stages"]["subsets"]["pixels_kept"] == 26  # ceil(0.1 · 256)
  before = json.loads((finished / "stages" / "controls.json").read_text())
  after = json.loads((workdir / "stages" / "controls.json").read_text())
  assert (after["masking_values"]["mean"]["base_on_bs_subsets"]
          != before["masking_values"]["mean"]["base_on_bs_subsets"])


def test_coarse_to_fine_selection_recomputes_sis_controls_and_report_only(finished, tmp_path):
  """sis.selection = "coarse_to_fine" gives per-pixel SISes placed by exact selection on
  patches: stage sis, the controls (their selections) and the report rerun, nothing else;
  report.md and report.json say which method and levels produced the SISes."""
  workdir = tmp_path / "run"
  shutil.copytree(finished, workdir)
  proc = run_main(workdir, "--config.sis.selection=coarse_to_fine", "--config.sis.patch_size=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for stage in ("train", "backselect", "subsets", "retrain"):
    assert f"Stage {stage}: already done." in proc.stderr, stage
  for stage in ("sis", "controls", "report"):
    assert f"Stage {stage}: running." in proc.stderr, stage
  assert ": epoch" not in proc.stderr  # no model is trained again
  report = json.loads((workdir / "report.json").read_text())
  s = report["stages"]["sis"]
  assert s["selection"] == "coarse_to_fine" and s["patch_size"] == 1
  assert s["coarse_to_fine"]["patch_sizes"] == [4, 2, 1]
  assert set(s["coarse_to_fine"]["median_start"]) == set(s["models"])
  assert all(64 <= v <= 256 for v in s["coarse_to_fine"]["median_start"].values())
  md = (workdir / "report.md").read_text()
  assert "coarse-to-fine backward selection: exact selection on 4×4 and 2×2 patches" in md
  with np.load(workdir / "sis" / "single.coarse_to_fine.npz") as rec:
    assert np.all(rec["fine_start"] >= 64)  # config.coarse_to_fine.min_pixels
  # Back to exact selection on 2x2 patches: the first run's SIS records are reused.
  proc = run_main(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Exact backward selection" not in proc.stderr
