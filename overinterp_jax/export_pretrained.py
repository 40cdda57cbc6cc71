"""Ships a finished training run's base model in the package (``models/weights/``).

  python -m overinterp_jax.export_pretrained --config=configs/cifar10_cpu.py \\
      --workdir=workdirs/cifar10_cpu --config.data.path=/data/cifar10_jpeg.tar.gz

Give the config (with the overrides) and the data the run was trained with: the
base model is found only if ``<workdir>/base_model/summary.json`` carries the same
fingerprint, so weights never ship under another config's name. Restores the
final checkpoint, re-measures it on the test set (read through its feed, so streamed
data works) and, for a 10-class model, on the shipped 1,000-image CIFAR-10 slice, and
writes ``<name>.msgpack`` + ``<name>.json`` (``models/shipped.py``).
"""
from __future__ import annotations

import datetime
import json
import os

from absl import app, flags
from ml_collections import config_flags

from overinterp_jax import config_reads
from overinterp_jax import data as data_lib
from overinterp_jax import train
from overinterp_jax.data import cifar10_slice
from overinterp_jax.models import shipped
from overinterp_jax.pipeline import trained
from overinterp_jax.pipeline.context import Context

# Where this machine keeps things; not part of what the model is.
MACHINE_KEYS = ("data.path", "data.cache_dir", "data.data_dir")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config the run was trained with.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory of the finished run.")
flags.DEFINE_string("name", "resnet20_cifar10", "Name to ship the model under.")
flags.DEFINE_string("out", shipped.WEIGHTS_DIR, "Directory to write the weights to.")
flags.DEFINE_string("note", "", "A remark to keep in the record (e.g. what the model is for).")
flags.mark_flags_as_required(["config", "workdir"])


def _accuracy(base: trained.Trained, images, labels, config, mesh) -> float:
  """Accuracy on ``images`` (a ``data.loader.Feed`` or model inputs ``[N, H, W, C]``)
  with labels ``[N]``."""
  logits = trained.predict_logits(base.apply, base.variables, images,
                                  batch_size=int(config.eval_batch_size), mesh=mesh)
  return float((logits.argmax(-1) == labels).mean())


def export(config, workdir: str, name: str, out: str, config_path: str = "",
           overrides: dict | None = None, note: str = "") -> dict:
  """Writes ``out/<name>.{msgpack,json}`` from ``workdir/base_model``; returns the record.

  ``config_path``, ``overrides`` (``{key: value}`` given on the command line, less the
  paths of this machine) and ``note`` are kept in the record.
  """
  overrides = {k: v for k, v in (overrides or {}).items() if k not in MACHINE_KEYS}
  dataset = data_lib.load_for_config(config.data, workdir, view=data_lib.view_for_config(config))
  ctx = Context(config, workdir, dataset)
  model_dir = ctx.path("base_model")
  summary = trained.load_summary(config, model_dir, ctx.data_fp)
  if summary is None:
    raise ValueError(f"{model_dir} holds no finished model of this config; give the config, "
                     "overrides and data it was trained with.")
  state = train.restore_trained(config, model_dir, dataset.image_shape,
                                dataset.num_examples("train"), ctx.mesh)
  if state is None:
    raise ValueError(f"{model_dir}: no checkpoint of the last epoch ({config.train.num_epochs}).")
  base = trained.Trained(train.build_model(config),
                         {"params": state.params, "batch_stats": state.batch_stats}, {}, 0.0)
  piece = cifar10_slice.load()["test"]
  record = {
      "model": config.model.name, "num_classes": int(config.model.num_classes),
      "bn_momentum": float(config.model.bn_momentum), "image_shape": list(dataset.image_shape),
      "class_names": list(dataset.class_names),
      "normalization": dataset.normalization.to_dict(),
      "config": config_path, "overrides": overrides,
      # The config values its training read (config_reads): what a user must match.
      "train_settings": {p: config_reads.value_at(config, p) for p in summary["config_reads"]},
      "fingerprint": summary["fingerprint"], "num_epochs": int(config.train.num_epochs),
      "train_seconds": round(float(summary["seconds"]), 1),
      "test_accuracy": float(summary["metrics"]["accuracy"]),
      "test_images": int(summary["metrics"]["count"]),
      "test_accuracy_at_export": _accuracy(base, dataset.feed("test"), dataset.labels("test"),
                                           config, ctx.mesh),
  }
  # The shipped slice is CIFAR-10's: models of another number of classes skip it (ImageNet).
  if dataset.num_classes == len(piece.class_names):
    record["slice_accuracy"] = _accuracy(base, dataset.prepare(piece.images), piece.labels,
                                         config, ctx.mesh)
    record["slice_images"] = len(piece)
  record["exported"] = datetime.date.today().isoformat()
  if note:
    record["note"] = note
  return shipped.save(name, base.variables, record, out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  record = export(FLAGS.config, FLAGS.workdir, FLAGS.name, FLAGS.out,
                  config_flags.get_config_filename(FLAGS["config"]),
                  config_flags.get_override_values(FLAGS["config"]), FLAGS.note)
  print(json.dumps({k: v for k, v in record.items() if k != "train_settings"}, indent=1))


if __name__ == "__main__":
  app.run(main)
