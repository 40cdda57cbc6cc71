"""Command line: ``python -m overinterp_jax.main --config=configs/<name>.py --workdir=<dir>``.

Runs the pipeline stages listed in ``config.stages`` (``pipeline/runner.py``):
train → backselect → subsets → retrain → sis → controls → report. Any config
key can be overridden with ``--config.<key>=<value>``; the config is locked,
so a key that does not exist is rejected with a message naming it. Re-running
with the same ``--workdir`` resumes.
"""
from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from overinterp_jax import data as data_lib
from overinterp_jax import train
from overinterp_jax.models import shipped
from overinterp_jax.pipeline import masked_data, retrain_stage, runner, sis_stage

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])

KNOWN_STAGES = runner.STAGES


def _subset_of(key: str, values, known) -> None:
  unknown = [v for v in values if v not in known]
  if unknown:
    raise ValueError(f"config.{key} has unknown values {unknown}; known: {list(known)}.")


def _in_range(key: str, value, low, high, low_open=True) -> None:
  ok = (low < value if low_open else low <= value) and value <= high
  if not ok:
    raise ValueError(f"config.{key} must be in {'(' if low_open else '['}{low}, {high}], "
                     f"got {value}.")


def validate_config(config) -> None:
  """Fails before any work starts, naming the offending key."""
  _subset_of("stages", config.stages, KNOWN_STAGES)
  if int(config.host_devices) < 0:
    raise ValueError(f"config.host_devices must be >= 0 (0 = JAX's default), got "
                     f"{config.host_devices}.")
  for key in ("num_epochs", "batch_size", "eval_batch_size", "eval_every", "num_classes"):
    if int(config[key]) < 1:
      raise ValueError(f"config.{key} must be >= 1, got {config[key]}.")
  if not config.lr > 0:
    raise ValueError(f"config.lr must be > 0, got {config.lr}.")
  train.epoch_scales(config)  # raises on a malformed config.progressive_resizing
  train.build_model(config)  # raises on an unknown model or a bad bn_momentum / keep_prob
  train.augment_flip(config)
  if int(config.augment_padding) < 0:
    raise ValueError(f"config.augment_padding must be >= 0, got {config.augment_padding}.")
  d = config.data
  if d.source == "image_folder" and d.path and not os.path.exists(d.path):
    raise ValueError(f"config.data.path={d.path!r} does not exist (config.data.source="
                     "'image_folder' needs a folder or .tar.gz of <split>/<class>/<image>).")
  if d.source == "tfds" and d.data_dir and not os.path.isdir(d.data_dir):
    raise ValueError(f"config.data.data_dir={d.data_dir!r} is not a directory.")
  b = config.backselect
  _subset_of("backselect.method", [b.method], ("exact", "gradient"))
  for key in ("remove_per_step", "batch_size", "shard_size"):
    if int(b[key]) < 1:
      raise ValueError(f"config.backselect.{key} must be >= 1, got {b[key]}.")
  if not b.noise_std >= 0:
    raise ValueError(f"config.backselect.noise_std must be >= 0, got {b.noise_std}.")
  _in_range("subsets.frac_kept", config.subsets.frac_kept, 0, 1)
  _subset_of("retrain.kinds", config.retrain.kinds, retrain_stage.KINDS)
  s = config.sis
  _in_range("sis.threshold", s.threshold, 0, 1)
  _in_range("sis.min_confidence", s.min_confidence, 0, 1, low_open=False)
  if config.pretrained and config.pretrained not in shipped.available():
    raise ValueError(f"config.pretrained={config.pretrained!r} is not a shipped model; "
                     f"shipped: {shipped.available()}.")
  _subset_of("sis.models", s.models, sis_stage.MODELS)
  _in_range("sis.input_dropout_keep_prob", s.input_dropout_keep_prob, 0, 1)
  for key in ("num_images", "patch_size", "ensemble_size", "input_dropout_samples"):
    if int(s[key]) < 1:
      raise ValueError(f"config.sis.{key} must be >= 1, got {s[key]}.")
  if int(s.images_per_call) < 0:
    raise ValueError(f"config.sis.images_per_call must be >= 0 (0 = all at once), got "
                     f"{s.images_per_call}.")
  c = config.controls
  _subset_of("controls.masking_values", c.masking_values, masked_data.MASKING_VALUES)
  if int(c.dilation) < 1 or int(c.dilation) % 2 == 0:
    raise ValueError(f"config.controls.dilation must be a positive odd integer, got "
                     f"{c.dilation}.")


def run(config, workdir: str) -> dict:
  """Runs the configured stages in ``workdir``; returns the results written there."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as fh:
    fh.write(config.to_json_best_effort(indent=1))
  dataset = data_lib.load_for_config(config.data, workdir)
  results = runner.run_pipeline(config, workdir, dataset)
  tmp = os.path.join(workdir, "results.json.tmp")
  with open(tmp, "w") as fh:
    json.dump(results, fh, indent=1)
  os.replace(tmp, os.path.join(workdir, "results.json"))
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  # Before any JAX operation initialises the CPU backend; a negative value is left to
  # validate_config, which names it.
  if int(config.host_devices) > 0:
    jax.config.update("jax_num_cpu_devices", int(config.host_devices))
  if config.distributed:
    jax.distributed.initialize()
  logging.info("Devices: %s", jax.devices())
  results = run(config, FLAGS.workdir)
  print(json.dumps(results, indent=1))


USAGE = """\
python -m overinterp_jax.main --config=FILE[:VARIANT] --workdir=DIR [--config.KEY=VALUE ...]

  --config=FILE[:VARIANT]  the experiment, e.g. configs/cifar10_cpu.py:analyze (the quick start)
  --workdir=DIR            where checkpoints, results and report.md go; the same DIR resumes
  --config.KEY=VALUE       override one key of the config, e.g. --config.num_epochs=5
  --verbosity=N            log level: 0 = INFO (default), -1 = warnings only
  --helpfull               every flag, absl's and JAX's included

Configs: configs/cifar10_cpu.py[:analyze], configs/cifar10.py, configs/smoke.py; each file
lists its keys with their defaults. Docs: README.md and docs/."""

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "-?")


if __name__ == "__main__":
  if any(arg in HELP_FLAGS for arg in sys.argv[1:]):
    print(USAGE)
    sys.exit(0)
  app.run(main)
