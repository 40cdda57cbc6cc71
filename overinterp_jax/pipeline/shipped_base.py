"""A given model as the pipeline's base model: a shipped one (``config.model.pretrained =
"<name>"``) or weights from a path (``config.model.weights``: a ``.safetensors`` file in
torchvision/timm layout, or a training work directory of ours with orbax checkpoints).

With it, stage ``train`` loads ``models.pretrained(name)`` instead of training, and
measures it on the run's test images; every later stage works on it as on a model
the run trained. Its fingerprint is the weights' sha256 (with the data's), so
results of one shipped model are never reused for another.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging

from overinterp_jax import config_reads, config_schema, train
from overinterp_jax.models import shipped, torch_weights
from overinterp_jax.pipeline import trained
from overinterp_jax.store import checkpoints, hashing


def fingerprint(name: str, data_fp: str) -> str:
  return hashing.fingerprint("pretrained", name, shipped.info(name)["sha256"], data_fp)


# Keys of a record's ``train_settings`` renamed before config_schema.MOVED_KEYS: the
# model's name was ``config.model`` before ``config.model`` became a section; the
# training seed was ``seed``; the input-dropout keep probability ``input_dropout_keep_prob``.
_RENAMED_SETTINGS = {"model": "model.name", "seed": "train.seed",
                     "input_dropout_keep_prob": "model.input_keep_prob"}


def setting_path(path: str) -> str:
  """Today's config path of a ``train_settings`` key of a record exported at any time
  (``"lr"`` -> ``"train.lr"``, ``"augment.flip"`` -> ``"train.augment.flip"``)."""
  if path in _RENAMED_SETTINGS:
    return _RENAMED_SETTINGS[path]
  return config_schema.moved_path(path) or path


def differing_settings(config, record: dict) -> list[str]:
  """The config paths (sorted) whose values differ from those ``record``'s model was
  trained with (its ``train_settings``: ``{dotted path: value}``, old paths read at their
  new places)."""
  settings = {setting_path(path): v for path, v in record["train_settings"].items()}
  return sorted(path for path, v in settings.items()
                if _plain(config_reads.value_at(config, path)) != v)


def check_compatible(config, dataset, warn: bool = True) -> None:
  """ValueError naming ``config.model.pretrained`` unless the model fits the config and the data:
  same architecture and classes, same class names, image shape and normalisation.
  ``warn``: log the training settings that differ from the config's (once a run: the
  pipeline's context checks, ``load`` does not repeat it)."""
  name = config.model.pretrained
  record = shipped.info(name)
  where = (f"config.model.pretrained={name!r} (a {record['model']} for "
           f"{record['num_classes']} classes)")
  if ((config.model.name, int(config.model.num_classes))
      != (record["model"], int(record["num_classes"]))):
    raise ValueError(f"{where} does not match config.model.name={config.model.name!r}, "
                     f"config.model.num_classes={config.model.num_classes}.")
  if tuple(dataset.class_names) != tuple(record["class_names"]):
    raise ValueError(f"{where} was trained on classes {record['class_names']}; the data has "
                     f"{list(dataset.class_names)}.")
  if list(dataset.image_shape) != list(record["image_shape"]):
    raise ValueError(f"{where} takes images {record['image_shape']}; the data's are "
                     f"{list(dataset.image_shape)}.")
  differ = differing_settings(config, record)
  if differ and warn:
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
  """``trained.Trained`` of ``config.model.pretrained`` with its loss and accuracy on
  ``dataset``'s test images; ValueError as ``check_compatible`` (whose warning the
  pipeline's context gives)."""
  check_compatible(config, dataset, warn=False)
  module, variables = shipped.pretrained(config.model.pretrained)
  return measured(trained.Trained(module, variables, {}, 0.0), config, dataset, mesh)


def weights_fingerprint(path: str, data_fp: str) -> str:
  """What identifies ``config.model.weights``: the sha256 of the file (or of the
  checkpoint directory's stored checksums), with the data's; for a file, also that of
  the timm ``config.json`` beside it, which ``model.transform_input="auto"`` reads."""
  if os.path.isdir(path):
    step, digests = _checkpoint_files(path)
    return hashing.fingerprint("weights", step, hashing.file_sha256(digests), data_fp)
  sidecar = torch_weights.timm_config_path(path)
  beside = (hashing.file_sha256(str(sidecar)),) if sidecar.is_file() else ()
  return hashing.fingerprint("weights", hashing.file_sha256(path), *beside, data_fp)


def _checkpoint_files(workdir: str) -> tuple[int, str]:
  """``(step, checksum file)`` of the newest checkpoint in training work directory
  ``workdir``; ValueError naming ``config.model.weights`` when there is none or its
  checksums are missing (the weights could not be verified)."""
  directory = os.path.join(workdir, "checkpoints")
  steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(
      directory) else []
  if not steps:
    raise ValueError(f"config.model.weights={workdir!r}: a directory must be a training work "
                     "directory holding checkpoints/<step> (or give a .safetensors file).")
  digests = checkpoints.files(workdir, steps[-1])[1]
  if not os.path.exists(digests):
    raise ValueError(f"config.model.weights={workdir!r}: checkpoint {steps[-1]} has no stored "
                     f"checksums ({digests}), so its weights cannot be verified.")
  return steps[-1], digests


def load_weights(config, dataset, mesh=None) -> trained.Trained:
  """The base model ``config.model.name`` with the weights at ``config.model.weights``,
  with its loss and accuracy on ``dataset``'s test images."""
  path = config.model.weights
  module = train.build_model(config)
  if os.path.isdir(path):
    # The newest checkpoint, the one weights_fingerprint names; never another, and nothing
    # in the user's directory is deleted or written (unlike resuming a training run).
    step, _ = _checkpoint_files(path)
    tx = train.make_optimizer(config, 1)
    template = train.create_train_state(module, tx, dataset.image_shape, jax.random.key(0))
    manager = checkpoints.manager(os.path.join(path, "checkpoints"),
                                  config.train.checkpoints_to_keep)
    try:
      state = checkpoints.restore_verified(manager, path, step, template)
    finally:
      manager.close()
    if state is None:
      raise ValueError(f"config.model.weights={path!r}: checkpoint {step} fails its checksums "
                       "(the error above names it).")
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logging.info("Base model: %s, checkpoint %d of %s.", config.model.name, step, path)
    epochs = step  # our training checkpoints one step per epoch
  else:
    variables = torch_weights.load_safetensors(path, config.model.name,
                                               int(config.model.num_classes))
    logging.info("Base model: %s with the weights of %s.", config.model.name, path)
    epochs = 0
  return measured(trained.Trained(module, variables, {}, 0.0, epochs=epochs), config, dataset,
                  mesh)


def measured(base: trained.Trained, config, dataset, mesh=None) -> trained.Trained:
  """``base`` with its loss, accuracy and count on ``dataset``'s test images."""
  variables = base.variables
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
