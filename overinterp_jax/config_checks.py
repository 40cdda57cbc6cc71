"""Every config value and cross-key constraint, checked before any work starts.

``validate_config(config, num_devices)`` needs nothing but the config (and the
device count; the stages are the registry's, the allowed values the schema's);
``validate_with_data(config, dataset)`` checks what depends on
the loaded data (its classes, image size and count) and runs right after the
data load, before anything is written to the work directory. Both raise
``ValueError`` naming the offending key. ``unknown_override(config, argv)``
names a ``--config.<key>`` that does not exist, with the closest existing keys.
"""
from __future__ import annotations

import difflib
import os
import re
from typing import Optional, Sequence

from overinterp_jax import config_schema, cpu_budget, precision
from overinterp_jax.data import NORMALIZATIONS, SOURCES, transforms, view_for_config
from overinterp_jax.data import loader as data_loader
from overinterp_jax.models import shipped
from overinterp_jax.pipeline import registry

CROPS = ("device", "inception")  # config.train.augment.crop


def _subset_of(key: str, values, known) -> None:
  unknown = [v for v in values if v not in known]
  if unknown:
    raise ValueError(f"config.{key} has unknown values {unknown}; known: {list(known)}.")


def _one_of(key: str, value, known) -> None:
  if value not in known:
    raise ValueError(f"config.{key} must be one of {list(known)}, got {value!r}.")


def _in_range(key: str, value, low, high, low_open=True, high_open=False) -> None:
  ok = ((low < value if low_open else low <= value)
        and (value < high if high_open else value <= high))
  if not ok:
    raise ValueError(f"config.{key} must be in {'(' if low_open else '['}{low}, {high}"
                     f"{')' if high_open else ']'}, got {value}.")


def _at_least(section, prefix: str, keys: Sequence[str], low: int) -> None:
  for key in keys:
    if int(section[key]) < low:
      raise ValueError(f"config.{prefix}{key} must be >= {low}, got {section[key]}.")


def _booleans(section, prefix: str, keys: Sequence[str]) -> None:
  for key in keys:
    if not isinstance(section[key], bool):
      raise ValueError(f"config.{prefix}{key} must be True or False, got {section[key]!r}.")


def _training(config, num_devices: int) -> None:
  from overinterp_jax import train  # here: importing the checks loads no orbax
  t = config.train
  _at_least(config, "", ("eval_batch_size",), 1)
  _at_least(t, "train.", ("num_epochs", "eval_every", "checkpoints_to_keep"), 1)
  # 0 = the largest per-device batch that fits the device's memory (main.run resolves it).
  _at_least(t, "train.", ("batch_size",), 0)
  _at_least(config.model, "model.", ("num_classes",), 2)
  if not t.lr > 0:
    raise ValueError(f"config.train.lr must be > 0, got {t.lr}.")
  _one_of("train.schedule", t.schedule, train.SCHEDULES)
  _one_of("model.precision", config.model.precision, tuple(precision.POLICIES))
  milestones = list(t.lr_milestones)
  if any(int(m) != m or m < 1 for m in milestones) or milestones != sorted(milestones):
    raise ValueError(f"config.train.lr_milestones must be increasing epochs >= 1, got "
                     f"{t.lr_milestones}.")
  if not t.lr_decay > 0:
    raise ValueError(f"config.train.lr_decay must be > 0, got {t.lr_decay}.")
  _in_range("train.warmup_fraction", t.warmup_fraction, 0, 1, high_open=True)
  _in_range("train.momentum", t.momentum, 0, 1, low_open=False, high_open=True)
  if not t.weight_decay >= 0:
    raise ValueError(f"config.train.weight_decay must be >= 0, got {t.weight_decay}.")
  _booleans(t, "train.", ("nesterov",))
  cpu_budget.epoch_scales(config)  # raises on a malformed config.train.progressive_resizing
  train.build_model(config)  # raises on an unknown model or a bad bn_momentum / keep_prob
  weights = config.model.weights
  if weights and not os.path.exists(weights):
    raise ValueError(f"config.model.weights={weights!r} does not exist (a .safetensors file "
                     "or an orbax checkpoint directory).")
  view_for_config(config)  # raises on a named view without sizes for config.model.name
  _booleans(t.augment, "train.augment.", ("enabled",))
  cpu_budget.augment_flip(config)
  _at_least(t.augment, "train.augment.", ("padding",), 0)
  _one_of("train.augment.crop", t.augment.crop, CROPS)
  _at_least(config.runtime, "runtime.", ("checkpoint_every_steps", "data_workers"), 0)
  if int(t.batch_size):
    train.check_batch(config, num_devices=num_devices)


def _data(d) -> None:
  _one_of("data.source", d.source, SOURCES)
  _one_of("data.normalization", d.normalization, NORMALIZATIONS)
  _at_least(d, "data.", ("expected_train", "expected_test", "view_size", "view_resize"), 0)
  _booleans(d, "data.", ("in_memory",))
  if (len(d.folder_splits) != 2
      or not all(isinstance(f, str) and f and "/" not in f for f in d.folder_splits)):
    raise ValueError(f"config.data.folder_splits must name two sub-folders (train, test), "
                     f"got {tuple(d.folder_splits)}.")
  _one_of("data.view", d.view, transforms.VIEWS)
  if d.view_resize and d.view_resize < d.view_size:
    raise ValueError(f"config.data.view_resize={d.view_resize} must be >= data.view_size="
                     f"{d.view_size} (the shorter side is resized, then the view cropped).")
  if not d.in_memory and d.source == "image_folder" and not d.path:
    raise ValueError("config.data.in_memory=False streams an image folder or archive: set "
                     "config.data.path (the shipped CIFAR-10 slice is always in memory).")
  # An empty path is the CIFAR-10 slice shipped in the package (data/cifar10_slice.py).
  if d.source == "image_folder" and d.path and not os.path.exists(d.path):
    raise ValueError(f"config.data.path={d.path!r} does not exist (config.data.source="
                     "'image_folder' needs a folder or .tar.gz of <split>/<class>/<image>).")
  if d.source == "tfds" and d.data_dir and not os.path.isdir(d.data_dir):
    raise ValueError(f"config.data.data_dir={d.data_dir!r} is not a directory.")
  if d.source == "synthetic":
    _at_least(d, "data.", ("num_train", "num_test", "image_size"), 1)
    _at_least(d, "data.", ("num_classes",), 2)


def _coarse_to_fine(c) -> None:
  from overinterp_jax.sis import coarse_to_fine  # pylint: disable=import-outside-toplevel
  if not coarse_to_fine.valid_patch_sequence(c.patch_sizes):
    raise ValueError(f"config.coarse_to_fine.patch_sizes={c.patch_sizes!r} must be positive "
                     "integers, strictly decreasing, each dividing the one before, ending "
                     "with 1 (pixels).")
  if not c.margin >= 1:
    raise ValueError(f"config.coarse_to_fine.margin must be >= 1, got {c.margin}.")
  _at_least(c, "coarse_to_fine.", ("min_pixels",), 0)


def _stages(config) -> None:
  b = config.backselect
  _one_of("backselect.method", b.method, config_schema.BACKSELECT_METHODS)
  _in_range("backselect.switch_fraction", b.switch_fraction, 0, 1)
  _at_least(b, "backselect.", ("remove_per_step", "shard_size"), 1)
  # 0 = as many images per pass as fit the device's memory (overinterp_jax/memory.py).
  _at_least(b, "backselect.", ("batch_size",), 0)
  if not b.noise_std >= 0:
    raise ValueError(f"config.backselect.noise_std must be >= 0, got {b.noise_std}.")
  _in_range("subsets.frac_kept", config.subsets.frac_kept, 0, 1)
  _subset_of("retrain.kinds", config.retrain.kinds, config_schema.RETRAIN_KINDS)
  _at_least(config.retrain, "retrain.", ("num_epochs",), 0)
  s = config.sis
  _in_range("sis.threshold", s.threshold, 0, 1)
  _in_range("sis.min_confidence", s.min_confidence, 0, 1, low_open=False)
  _one_of("sis.selection", s.selection, config_schema.SIS_SELECTIONS)
  _booleans(s, "sis.", ("only_correct", "sample_all_models"))
  _at_least(s, "sis.", ("bootstrap_samples",), 100)
  if s.selection == "backselect" and int(s.patch_size) != 1:
    raise ValueError(f"config.sis.patch_size={s.patch_size}: sis.selection='backselect' "
                     "reuses stage backselect's pixel records (patch_size must be 1).")
  if s.selection == "coarse_to_fine" and int(s.patch_size) != 1:
    raise ValueError(f"config.sis.patch_size={s.patch_size}: sis.selection='coarse_to_fine' "
                     "selects pixels (patch_size must be 1; its levels' patches are "
                     "config.coarse_to_fine.patch_sizes).")
  _coarse_to_fine(config.coarse_to_fine)
  m = config.model
  if m.pretrained and m.weights:
    raise ValueError(f"config.model.pretrained={m.pretrained!r} and config.model.weights="
                     f"{m.weights!r} both give the base model; set one.")
  if m.pretrained and m.pretrained not in shipped.available():
    raise ValueError(f"config.model.pretrained={m.pretrained!r} is not a shipped model; "
                     f"shipped: {shipped.available()}.")
  _subset_of("sis.models", s.models, config_schema.SIS_MODELS)
  if not s.models and any(st in config.stages for st in ("sis", "controls", "report")):
    raise ValueError("config.sis.models is empty, but stages sis, controls and report "
                     "need at least one model.")
  _in_range("sis.input_dropout_keep_prob", s.input_dropout_keep_prob, 0, 1)
  _at_least(s, "sis.", ("patch_size", "ensemble_size", "input_dropout_samples"), 1)
  _at_least(s, "sis.", ("num_images",), 0)
  _at_least(s, "sis.", ("images_per_call", "ensemble_epochs", "input_dropout_epochs"), 0)
  c = config.controls
  _subset_of("controls.masking_values", c.masking_values, config_schema.MASKING_VALUES)
  if int(c.dilation) < 1 or int(c.dilation) % 2 == 0:
    raise ValueError(f"config.controls.dilation must be a positive odd integer, got "
                     f"{c.dilation}.")
  _booleans(c, "controls.", ("smoothed", "targeted", "confidence_rise", "gradient_vs_exact"))
  _at_least(c, "controls.", ("smoothed_images", "masking_test_images"), 0)
  if not c.blur_sigma > 0:
    raise ValueError(f"config.controls.blur_sigma must be > 0, got {c.blur_sigma}.")
  if not c.noise_scale >= 0:
    raise ValueError(f"config.controls.noise_scale must be >= 0, got {c.noise_scale}.")
  _at_least(config.report, "report.", ("num_figure_images",), 1)


def _runtime(r) -> None:
  _booleans(r, "runtime.", ("progress", "distributed", "compilation_cache"))
  if int(r.host_devices) < 0:
    raise ValueError(f"config.runtime.host_devices must be >= 0 (0 = JAX's default), got "
                     f"{r.host_devices}.")
  _one_of("runtime.bad_files", r.bad_files, data_loader.BAD_FILES)
  _at_least(r, "runtime.", ("max_bad_files",), 0)
  if not (r.loss_explosion_factor == 0 or r.loss_explosion_factor > 1):
    raise ValueError(f"config.runtime.loss_explosion_factor must be > 1 (or 0 = no limit), "
                     f"got {r.loss_explosion_factor}.")


def _bad_files(config) -> None:
  if config.runtime.bad_files == "skip" and config.data.in_memory:
    raise ValueError("config.runtime.bad_files='skip' leaves unreadable files out of streamed "
                     "data (config.data.in_memory=False) only; data loaded in memory is decoded "
                     "whole first, and every undecodable file is named.")


def _no_moved_keys(config) -> None:
  """A config file that still sets a key at its old place (which nothing reads) fails."""
  for old, new in config_schema.MOVED_KEYS.items():
    if old in config:
      raise ValueError(f"config.{old} moved to config.{new}; set that instead.")


def validate_config(config, num_devices: Optional[int] = None) -> None:
  """Fails before any work starts, naming the offending key. ``num_devices``: the
  devices a batch is split over (default: all of JAX's)."""
  if num_devices is None:
    import jax
    num_devices = jax.device_count()
  _no_moved_keys(config)
  if not config.stages:
    raise ValueError(f"config.stages is empty; known stages: {list(registry.names())}.")
  _subset_of("stages", config.stages, registry.names())
  _runtime(config.runtime)
  _bad_files(config)
  _training(config, num_devices)
  _data(config.data)
  _stages(config)


def validate_with_data(config, dataset) -> None:
  """The constraints between ``config`` and the loaded ``dataset``; run before any file of
  the run is written."""
  # Here: importing the checks loads neither orbax nor matplotlib.
  from overinterp_jax import train
  from overinterp_jax.pipeline import sis_sample
  if int(config.model.num_classes) != dataset.num_classes:
    raise ValueError(f"config.model.num_classes={config.model.num_classes}, but the data has "
                     f"{dataset.num_classes} classes ({', '.join(dataset.class_names[:12])}"
                     f"{', ...' if dataset.num_classes > 12 else ''}).")
  sis_sample.patch_feature_map(int(config.sis.patch_size), dataset.image_shape[:2])
  # Some model is trained: the base (unless a shipped one is loaded), retrained
  # models, or the ensemble's members and the input-dropout model.
  if ((not config.model.pretrained and not config.model.weights) or config.retrain.kinds
      or set(config.sis.models) - {"single"}):
    train.check_batch(config, num_train=dataset.num_examples("train"))


def _override_paths(argv: Sequence[str]) -> list[str]:
  """The dotted key paths of ``--config.<path>[=value]`` (or ``--noconfig.<path>``) in argv."""
  paths = []
  for arg in argv:
    m = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    if m:
      paths.append(m.group(1))
  return paths


def unknown_override(config, argv: Sequence[str]) -> Optional[str]:
  """One line naming the first ``--config.<key>`` of ``argv`` that ``config`` lacks: where
  it moved (``config_schema.MOVED_KEYS``), or the closest existing keys at that level;
  None when every key exists."""
  for path in _override_paths(argv):
    moved = config_schema.moved_path(path)
    if moved is not None and path.partition(".")[0] not in config:
      return f"config.{path} moved to config.{moved}."
    node, done = config, []
    for part in path.split("."):
      if not hasattr(node, "keys") or part not in node:
        here = "config" + "".join(f".{p}" for p in done)
        keys = list(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(part, keys, n=3, cutoff=0.0)
        hint = f"; closest: {', '.join(f'{here}.{k}' for k in close)}" if close else ""
        return f"Unknown config key config.{path}: {here} has no key {part!r}{hint}."
      node, done = node[part], done + [part]
  return None
