"""The front door: `--help`, and the quick-start config on the shipped model and test slice."""
import json
import os
import subprocess
import sys

import pytest

from configs import cifar10_cpu
from overinterp_jax import data as data_lib
from overinterp_jax.models import shipped
from overinterp_jax.pipeline import context

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
  return subprocess.run([sys.executable, "-m", "overinterp_jax.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=900,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_help_lists_each_flag_on_one_line():
  proc = _main("--help")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  for flag in ("--config=FILE[:VARIANT]", "--workdir=DIR", "--config.KEY=VALUE", "--verbosity",
               "--helpfull"):
    assert sum(line.startswith(f"  {flag}") for line in lines) == 1, flag
  assert len(lines) <= 15


def test_analyze_runs_on_the_shipped_model_without_training(tmp_path):
  proc = _main("--config=configs/cifar10_cpu.py:analyze", f"--workdir={tmp_path}",
               "--config.sis.num_images=2", "--config.backselect.remove_per_step=512",
               "--config.runtime.progress=False")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not (tmp_path / "base_model").exists()  # loaded, not trained
  report = json.loads((tmp_path / "report.json").read_text())
  stages = report["stages"]
  record = shipped.info("resnet20_cifar10")
  assert abs(stages["train"]["test_accuracy"] - record["slice_accuracy"]) <= 0.002
  assert stages["backselect"]["test"]["count"] == 1000
  assert stages["backselect"]["train"] == {"count": 0, "num_features": 1024,
                                           "mean_original_score": None}
  base = stages["retrain"]["base_on_subsets"]
  assert set(base) == {"bs", "random", "border"} and base["bs"]["count"] == 1000
  assert stages["retrain"]["models"] == {}
  single = stages["sis"]["models"]["single"]
  # Sampled among images classified with confidence >= τ: every one has a SIS.
  assert single["count"] == 2 and single["fraction_with_sis"] == 1.0
  # Single pixels by coarse-to-fine selection (4×4 and 2×2 patches, then pixels).
  assert stages["sis"]["selection"] == "coarse_to_fine" and stages["sis"]["patch_size"] == 1
  assert single["median_pixels"] < 100
  md = (tmp_path / "report.md").read_text()
  assert "Base model on its own 5% test subsets" in md and "## SIS size at τ = 0.99" in md
  for name in ("sis_examples", "confidence_curves", "sis_sizes", "smoothed_sis",
               "confidence_rise"):
    assert (tmp_path / report["figures"][name]).read_bytes()[:4] == b"\x89PNG", name


def test_training_on_the_slice_is_refused_naming_the_keys():
  dataset = data_lib.load_dataset("image_folder", path="")
  config = cifar10_cpu.get_config("analyze")
  context.check_train_split(config, dataset)  # the quick start trains nothing
  config.model.pretrained = ""
  config.retrain.kinds = ("bs",)
  with pytest.raises(ValueError, match=r"no train images.*stage train without "
                                       r"config\.model\.pretrained.*config\.retrain\.kinds"):
    context.check_train_split(config, dataset)


def test_a_shipped_model_must_match_the_config():
  from overinterp_jax.pipeline import shipped_base
  dataset = data_lib.load_dataset("image_folder", path="")
  config = cifar10_cpu.get_config("analyze")
  shipped_base.check_compatible(config, dataset)
  config.model.name = "vgg16"
  with pytest.raises(ValueError,
                     match=r"config\.model\.pretrained='resnet20_cifar10'.*config\.model\.name"):
    shipped_base.check_compatible(config, dataset)
