"""The pipeline end to end on the smoke config: every stage, the report, kill -9 and resume."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from overinterp_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ("sis_examples.png", "confidence_vs_pixels_removed.png", "sis_size_histograms.png",
           "smoothed_sis_confidence.png", "confidence_rise.png")


def _command(workdir, *args):
  return [sys.executable, "-m", "overinterp_jax.main", "--config=configs/smoke.py",
          f"--workdir={workdir}", *args]


def _env():
  return {**os.environ, "JAX_PLATFORMS": "cpu"}


def run_main(workdir, *args):
  return subprocess.run(_command(workdir, *args), cwd=REPO, capture_output=True, text=True,
                        timeout=900, env=_env())


def _outputs(workdir):
  out = {name: (workdir / name).read_bytes() for name in ("report.md", "report.json")}
  out.update({f: (workdir / "figures" / f).read_bytes() for f in FIGURES})
  return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """One uninterrupted smoke run of every stage."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = run_main(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def test_report_has_every_section_and_figure(finished):
  md = (finished / "report.md").read_text()
  for heading in ("## Table 1: pixel-subset retraining", "## SIS size at τ = 0.4",
                  "### Smoothed SIS (dilated by 3×3)", "### Targeted SIS (random wrong class)",
                  "### Masking value", "### Confidence along backward selection", "## Figures"):
    assert heading in md, heading
  assert "5% BS mask only" in md
  report = json.loads((finished / "report.json").read_text())
  t1 = report["table1"]
  assert t1["model"] == "cnn3"
  for key in ("full", "full_same_budget", "bs_5pct", "random_5pct", "mask_only_5pct"):
    assert 0.0 <= t1[key] <= 1.0, key
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


def test_rerun_skips_finished_stages(finished):
  before = _outputs(finished)
  proc = run_main(finished)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count("already done") == 7
  assert _outputs(finished) == before
  assert len(train.read_metrics(str(finished / "base_model" / "metrics.jsonl"))) == 2


def test_kill_9_mid_backselect_then_resume_gives_identical_report(finished, tmp_path):
  shard = tmp_path / "backselect" / "train" / "shard_00000.npz"
  proc = subprocess.Popen(_command(tmp_path), cwd=REPO, env=_env(),
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
  assert _outputs(tmp_path) == _outputs(finished)


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
