"""The accelerator benchmark runs end to end on the CPU (small sizes), so it cannot rot."""
import importlib.util
import json
import math
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks",
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_accelerator_benchmark_small_on_cpu(tmp_path):
  accelerator = _load("accelerator")
  out = tmp_path / "acc.json"
  rows = accelerator.main(["--small", "--out", str(out)])
  names = [r["name"] for r in rows]
  assert names == ["resnet20 inference", "exact backselect resnet20", "gradient SIS resnet20",
                   "train resnet20", "train resnet50", "gradient SIS inception_v3 299"]
  for r in rows:
    assert r["value"] > 0 and r["flops_per_item"] > 0 and 0 < r["mfu"] < 10, r
  saved = json.loads(out.read_text())
  assert saved["small"] and saved["precision"] == "float32" and len(saved["rows"]) == 6


@pytest.mark.slow
def test_imagenet_bgsis_benchmark_small_on_cpu(tmp_path):
  """``benchmarks/imagenet_bgsis.py --small``: every column filled, both models (~35 s)."""
  bench = _load("imagenet_bgsis")
  out = tmp_path / "bgsis.json"
  rows = bench.main(["--small", "--out", str(out)])
  assert [(r["model"], r["image_size"], r["steps_per_image"]) for r in rows] == [
      ("inception_v3", 75, 57), ("resnet50", 32, 11)]
  for r in rows:
    for key in ("plain_fwd_bwd_img_per_s", "bgsis_passes_per_s", "ratio", "seconds_per_image",
                "peak_memory_bytes", "plain_fwd_bwd_flops_per_image", "step_flops_per_image",
                "val_hours_this_device", "val_hours_H100/H200", "val_hours_TPU v5e"):
      assert math.isfinite(r[key]) and r[key] > 0, (key, r)
  saved = json.loads(out.read_text())
  assert saved["precision"] == "float32" and saved["rows"][0]["small"] and len(saved["rows"]) == 2


@pytest.mark.slow
def test_hybrid_cost_benchmark_tiny_on_cpu(tmp_path):
  """``benchmarks/hybrid_cost.py`` on one image, hybrid at 0.01 (11 pixels exactly; ~20 s)."""
  bench = _load("hybrid_cost")
  out = tmp_path / "hybrid.json"
  result = bench.main(["--images", "1", "--switch", "0.01", "--out", str(out)])
  assert list(result["methods"]) == ["gradient", "hybrid_0.01"]
  assert result["remove_per_step"] == 128 and result["kept_features"] == 52
  hybrid = result["methods"]["hybrid_0.01"]
  assert hybrid["model_evaluations_per_image"] == 66 and hybrid["gradient_passes_per_image"] == 9
  for row in result["methods"].values():
    assert row["seconds_per_image"] > 0 and 0 <= row["mean_confidence_5pct"] <= 1
    assert 0 <= row["fraction_at_least_tau"] <= 1
  assert 0 <= hybrid["overlap_with_gradient"] <= 1
  assert json.loads(out.read_text()) == result


@pytest.mark.slow
def test_selection_cost_benchmark_on_one_reference_image(tmp_path):
  """``benchmarks/selection_cost.py`` on the first stored exact reference: every method's
  row, SISes that reach τ, sizes compared with exact's, and the figure (~1 min)."""
  bench = _load("selection_cost")
  out, figure = tmp_path / "cost.json", tmp_path / "cost.png"
  result = bench.main(["--images", "1", "--margins", "--out", str(out), "--figure", str(figure)])
  assert list(result["methods"]) == ["exact", "coarse_to_fine m=1", "hybrid switch 0.1 (k=8)",
                                     "gradient (k=8)"]
  exact = result["methods"]["exact"]
  assert exact["sis_sizes"] == [24] and exact["model_evaluations_per_image"] == 524_800
  c2f = result["methods"]["coarse_to_fine m=1"]
  assert c2f["fraction_sis_reaches_tau"] == 1.0 and c2f["shared_images"] == 1
  assert 2_080 < c2f["model_evaluations_per_image"] < 20_000
  assert c2f["median_level_starts"][0] == 64 and c2f["median_level_starts"][2] >= 64
  for row in result["methods"].values():
    assert 0 <= row["mean_confidence_5pct"] <= 1 and row["seconds_per_image"] >= 0
  assert json.loads(out.read_text()) == result
  assert figure.read_bytes()[:4] == b"\x89PNG"


def _mitigations_log(tmp_path, lines: list[str]):
  """``benchmarks/mitigations_page.py`` and ``lines``, written as a log, parsed by it."""
  page = _load("mitigations_page")
  log = tmp_path / "run.log"
  log.write_text("\n".join(lines))
  return page, page.parse_log(str(log), 2026)


def test_mitigations_page_sums_stage_time_over_the_pieces_of_a_resumed_run(tmp_path):
  """Two processes in one log (a killed run and its resumption): time per stage is summed
  over both; a process whose stage lines were lost is reported apart, not guessed."""
  page, lines = _mitigations_log(tmp_path, [
      "I1201 10:00:00.000000 11 runner.py:105] Stage train: running.",
      "I1201 10:00:10.000000 11 runner.py:122] Stage train: done in 10.0 s.",
      "I1201 10:00:10.500000 11 runner.py:105] Stage sis: running.",
      "I1201 10:30:10.500000 11 train.py:445] epoch 3/33",  # then killed
      "some line that is not absl's",
      "I1201 11:00:00.000000 22 runner.py:103] Stage train: already done.",
      "I1201 11:00:00.000000 22 runner.py:105] Stage sis: running.",
      "I1201 11:20:00.000000 22 runner.py:122] Stage sis: done in 1200.0 s.",
      "I1201 11:20:00.000000 22 runner.py:105] Stage report: running.",
      "I1201 11:20:05.000000 22 runner.py:122] Stage report: done in 5.0 s.",
      "W1201 11:25:00.000000 33 deleter.py:300] a process whose stage lines were lost",
      "I1201 11:26:00.000000 33 train.py:445] epoch 4/33"])
  ps = page.pieces(lines)
  assert [p["process"] for p in ps] == ["11", "22", "33"]
  assert ps[0]["stages"] == {"train": 10.0, "sis": 1800.0}
  assert ps[1]["stages"] == {"sis": 1200.0, "report": 5.0}
  assert ps[2]["stages"] == {"stage not in the log": 60.0}
  assert page.overlaps(ps) == []
  ps[1]["start"] = ps[0]["start"]
  assert page.overlaps(ps) == [(0, 1)]


def test_mitigations_page_times_each_exact_sis_run_of_stage_sis(tmp_path):
  """A run's duration goes to the next run's line or the stage's end, in the same process;
  a run cut off by a kill (its process logs nothing more) is not listed."""
  page, lines = _mitigations_log(tmp_path, [
      "I1201 10:00:00.000000 11 runner.py:105] Stage sis: running.",
      "I1201 10:01:00.000000 11 sis_stage.py:163] Exact backward selection single: 100 images, 64 features.",
      "I1201 10:02:00.000000 11 sis_stage.py:163] Exact backward selection ensemble: 100 images, 64 features.",
      "I1201 10:03:00.000000 22 train.py:445] another process's line",
      "I1201 10:04:00.000000 11 runner.py:122] Stage sis: done in 240.0 s.",
      "I1201 10:04:00.000000 11 runner.py:105] Stage controls: running.",
      "I1201 10:05:00.000000 11 sis_stage.py:163] Exact backward selection targeted_single: 100 images, 64 features.",
      "I1201 10:06:00.000000 11 sis_stage.py:163] Exact backward selection single_mask_blur: 100 images, 64 features.",
      "I1201 10:09:00.000000 11 runner.py:122] Stage controls: done in 300.0 s.",
      "I1201 11:00:00.000000 33 sis_stage.py:163] Exact backward selection input_dropout: 10 images, 64 features."])
  calls = page.sis_calls(lines)
  assert calls == [{"name": "single", "images": 100, "seconds": 60.0},
                   {"name": "ensemble", "images": 100, "seconds": 120.0}]


@pytest.mark.slow
def test_sis_api_first_calls_cold_and_warm(tmp_path):
  """``benchmarks/sis_api.py --parts first``: cold, warm and cache-off first calls, each in a
  fresh process (3 processes, ~15 s)."""
  bench = _load("sis_api")
  out = tmp_path / "sis_api.json"
  result = bench.main(["--parts", "first", "--first_runs", "1", "--cases", "linear_10",
                       "--out", str(out)])
  row = result["first"]["linear_10"]
  for key in ("cold", "warm", "off", "second", "reference"):
    assert math.isfinite(row[key]) and row[key] > 0, (key, row)
  assert json.loads(out.read_text())["first"]["linear_10"] == row
