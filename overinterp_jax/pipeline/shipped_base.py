"""A shipped model as the pipeline's base model: ``config.pretrained = "<name>"``.

With it, stage ``train`` loads ``models.pretrained(name)`` instead of training, and
measures it on the run's test images; every later stage works on it as on a model
the run trained. Its fingerprint is the weights' sha256 (with the data's), so
results of one shipped model are never reused for another.
"""
from __future__ import annotations

import numpy as np
from absl import logging

from overinterp_jax import config_reads
from overinterp_jax.models import shipped
from overinterp_jax.pipeline import artifacts, trained


def fingerprint(name: str, data_fp: str) -> str:
  return artifacts.fingerprint("pretrained", name, shipped.info(name)["sha256"], data_fp)


def check_compatible(config, dataset) -> None:
  """ValueError naming ``config.pretrained`` unless the model fits the config and the data:
  same architecture and classes, same class names, image shape and normalisation."""
  name = config.pretrained
  record = shipped.info(name)
  where = f"config.pretrained={name!r} (a {record['model']} for {record['num_classes']} classes)"
  if (config.model, int(config.num_classes)) != (record["model"], int(record["num_classes"])):
    raise ValueError(f"{where} does not match config.model={config.model!r}, "
                     f"config.num_classes={config.num_classes}.")
  if tuple(dataset.class_names) != tuple(record["class_names"]):
    raise ValueError(f"{where} was trained on classes {record['class_names']}; the data has "
                     f"{list(dataset.class_names)}.")
  if list(dataset.image_shape) != list(record["image_shape"]):
    raise ValueError(f"{where} takes images {record['image_shape']}; the data's are "
                     f"{list(dataset.image_shape)}.")
  differ = sorted(path for path, v in record["train_settings"].items()
                  if _plain(config_reads.value_at(config, path)) != v)
  if differ:
    logging.warning("%s was trained with other %s than this config's; the report labels it "
                    "with the config's.", where, ", ".join(differ))
  norm = dataset.normalization
  want = record["normalization"]
  if not (np.allclose(norm.mean, want["mean"]) and np.allclose(norm.std, want["std"])):
    raise ValueError(f"{where} expects inputs normalised with {want}; the data's "
                     f"normalisation is {norm.to_dict()} (config.data.normalization).")


def _plain(value):
  """A config value as it reads back from JSON (tuples become lists)."""
  if isinstance(value, dict):
    return {k: _plain(v) for k, v in value.items()}
  return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def load(config, dataset, mesh=None) -> trained.Trained:
  """``trained.Trained`` of ``config.pretrained`` with its loss and accuracy on
  ``dataset``'s test images."""
  check_compatible(config, dataset)
  module, variables = shipped.pretrained(config.pretrained)
  base = trained.Trained(module, variables, {}, 0.0)
  logits = trained.predict_logits(base.apply, variables, dataset.feed("test"),
                                  batch_size=int(config.eval_batch_size), mesh=mesh)
  labels = dataset.labels("test")
  z = logits.astype(np.float64)
  z -= z.max(axis=-1, keepdims=True)
  log_p = z[np.arange(len(labels)), labels] - np.log(np.exp(z).sum(axis=-1))
  base.metrics = {"loss": float(-log_p.mean()),
                  "accuracy": float((logits.argmax(-1) == labels).mean()),
                  "count": int(len(labels))}
  return base
