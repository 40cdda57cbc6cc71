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
                   "gradient SIS inception_v3 299", "train resnet20", "train resnet50"]
  for r in rows:
    if "inception" in r["name"]:
      assert math.isnan(r["value"]) and "not measured" in r["note"]
      continue
    assert r["value"] > 0 and r["flops_per_item"] > 0 and 0 < r["mfu"] < 10, r
  saved = json.loads(out.read_text())
  assert saved["small"] and saved["precision"] == "float32" and len(saved["rows"]) == 6
