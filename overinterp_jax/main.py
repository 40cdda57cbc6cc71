"""Command line: ``python -m overinterp_jax.main --config=configs/<name>.py --workdir=<dir>``.

Runs the stages listed in ``config.stages`` (today: ``train``). Any config
key can be overridden with ``--config.<key>=<value>``; the config is locked,
so a key that does not exist is rejected with a message naming it. Re-running
with the same ``--workdir`` resumes.
"""
from __future__ import annotations

import json
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from overinterp_jax import data as data_lib
from overinterp_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])

KNOWN_STAGES = ("train",)


def validate_config(config) -> None:
  """Fails before any work starts, naming the offending key."""
  unknown = [s for s in config.stages if s not in KNOWN_STAGES]
  if unknown:
    raise ValueError(f"config.stages has unknown stages {unknown}; known: {list(KNOWN_STAGES)}.")
  for key in ("num_epochs", "batch_size", "eval_batch_size", "num_classes"):
    if int(config[key]) < 1:
      raise ValueError(f"config.{key} must be >= 1, got {config[key]}.")
  if not config.lr > 0:
    raise ValueError(f"config.lr must be > 0, got {config.lr}.")


def run(config, workdir: str) -> dict:
  """Runs the configured stages in ``workdir``; returns the results written there."""
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as fh:
    fh.write(config.to_json_best_effort(indent=1))
  dataset = data_lib.load_for_config(config.data, workdir)
  results = {}
  if "train" in config.stages:
    _, test_metrics = train.train_and_evaluate(
        config, os.path.join(workdir, "base_model"),
        dataset.train_images, dataset.train_labels, dataset.test_images, dataset.test_labels,
        prepare=dataset.prepare,
        augment_fn=dataset.augment_fn if config.data.augment else None)
    results["train"] = {"model": config.model, **test_metrics}
    logging.info("Test accuracy %.4f on %d images.", test_metrics["accuracy"],
                 test_metrics["count"])
  tmp = os.path.join(workdir, "results.json.tmp")
  with open(tmp, "w") as fh:
    json.dump(results, fh, indent=1)
  os.replace(tmp, os.path.join(workdir, "results.json"))
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  if config.distributed:
    jax.distributed.initialize()
  logging.info("Devices: %s", jax.devices())
  results = run(config, FLAGS.workdir)
  print(json.dumps(results, indent=1))


if __name__ == "__main__":
  app.run(main)
