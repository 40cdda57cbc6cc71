"""What every stage shares: config, work directory, data, mesh, and cached results.

Stages ask the context for what they build on (``base``, ``backselect(split)``,
``kept_count()``, ``sis_sample``...); each is computed once per process and read back
from the work directory on a re-run. Services several stages share are typed members:
``sis_sample`` (``sis_sample.SisSample``) is the SIS sample, its models and its records,
shared by stages sis and controls and their figures.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Optional

import numpy as np

from overinterp_jax import config_reads
from overinterp_jax import data as data_lib
from overinterp_jax import sharding
from overinterp_jax import train
from overinterp_jax.data import loader
from overinterp_jax.pipeline import (backselect_stage, masked_data, record_shards, shipped_base,
                                     sis_sample, sis_stage, subsets_stage, train_stage, trained)
from overinterp_jax.store import atomic, hashing

# Written by the runner into each stage's marker (``stages/<stage>.json``), beside what the
# stage returns; the report leaves them out of its results.
MARKER_KEYS = ("fingerprint", "config_reads", "config_known", "upstream", "outputs")


def check_train_split(config, dataset: data_lib.Dataset) -> None:
  """ValueError naming the config keys that need train images when ``dataset`` has none
  (the shipped CIFAR-10 slice): training the base model, retraining, more SIS models."""
  if dataset.num_examples("train"):
    return
  stages = config.stages
  needs = []
  if "train" in stages and not config.model.pretrained and not config.model.weights:
    needs.append("stage train without config.model.pretrained or config.model.weights")
  if "retrain" in stages and config.retrain.kinds:
    needs.append(f"config.retrain.kinds={tuple(config.retrain.kinds)}")
  trained_sis = [m for m in config.sis.models if m != "single"]
  if "sis" in stages and trained_sis:
    needs.append(f"config.sis.models with {trained_sis}")
  if needs:
    raise ValueError(f"The data has no train images (config.data.path is empty: the shipped "
                     f"CIFAR-10 test slice), but {'; '.join(needs)} train models. Pass the full "
                     "dataset (--config.data.path=<image folder or .tar.gz>, or "
                     "--config.data.source=tfds; docs/data.md), or analyse the shipped model "
                     "(configs/cifar10_cpu.py:analyze).")


class Context:
  """Shared state of one pipeline run in ``workdir``."""

  def __init__(self, config, workdir: str, dataset: data_lib.Dataset, mesh=None):
    self.config, self.workdir, self.data = config, workdir, dataset
    self.stage: Optional[str] = None  # the stage running now (set by the runner)
    self.mesh = mesh if mesh is not None else sharding.data_mesh()
    self.progress = bool(config.runtime.progress)
    self.data_fp = hashing.fingerprint(config.data, *dataset.fingerprint_parts())
    # The SIS sample, its models (built once per run) and their records, read through
    # stage sis's selection; shared by stages sis and controls and their figures.
    self.sis_sample: sis_sample.SisSample = sis_sample.SisSample(
        self, sis_stage.selection_records)
    # Caches of this run, held here rather than in modules (they are keyed on function
    # objects, which are this run's): jitted prediction functions (``trained.predict_logits``),
    # memory-fitted gradient batches (``backselect_stage``), and backward selections
    # (``backselect``).
    self.compiled_predict: dict = {}
    self.fitted_batches: dict = {}
    self._backselections: dict[tuple, record_shards.RecordSet] = {}
    check_train_split(config, dataset)
    if config.model.pretrained:
      shipped_base.check_compatible(config, dataset)

  def owned_by(self, stage: str):
    """A context for loading ``stage``'s results: from another stage, the reads it makes
    are not that stage's (``stage``'s fingerprint, upstream of it, covers them)."""
    if self.stage is None or self.stage == stage:
      return contextlib.nullcontext()
    return config_reads.paused()

  def path(self, *parts: str) -> str:
    return os.path.join(self.workdir, *parts)

  @property
  def height_width(self) -> tuple[int, int]:
    return tuple(self.data.image_shape[:2])

  @property
  def augment_fn(self):
    """The device-side crop + flip (``train.config_augment_fn``), or None when
    ``config.train.augment.enabled`` is off or the input pipeline crops on the host."""
    if not self.config.train.augment.enabled or self.config.train.augment.crop != "device":
      return None
    return train.config_augment_fn(self.config)

  def labels(self, split: str) -> np.ndarray:
    return self.data.labels(split)

  def feed(self, split: str) -> loader.Feed:
    """The full images of ``split`` as model inputs (``data.loader.Feed``)."""
    return self.data.feed(split)

  def training_feed(self, feed: loader.Feed) -> loader.Feed:
    """``feed`` with the host-side training crop when ``config.train.augment.crop`` asks."""
    host = self.config.train.augment.enabled and self.config.train.augment.crop == "inception"
    return dataclasses.replace(feed, train_crop=host, seed=int(self.config.train.seed))

  def train_model(self, name: str, config, train_feed=None, test_feed=None,
                  data_fp: Optional[str] = None) -> trained.Trained:
    """Trains (or loads) ``config`` in ``workdir/name`` on full images or the given feeds
    (pixel-subsets); ``data_fp`` identifies the given images (e.g. a checksum of their
    masks)."""
    full = train_feed is None
    with config_reads.recording() as reads:  # the augmentation's reads key the model too
      return trained.ensure_trained(
          config, self.path(name),
          self.training_feed(self.feed("train") if full else train_feed),
          self.feed("test") if full else test_feed, augment_fn=self.augment_fn,
          data_fp=self.data_fp if full else hashing.fingerprint(self.data_fp, name, data_fp),
          mesh=self.mesh, replace_stale=name != "base_model", reads=reads)

  @functools.cached_property
  def base(self) -> trained.Trained:
    """The base model (stage train's, ``train_stage.base_model``)."""
    return train_stage.base_model(self)

  @property
  def base_fp(self) -> str:
    """What identifies the base model: its ``trained.model_key`` (or the shipped weights)."""
    return self.base.key

  def backselect(self, split: str, indices: Optional[tuple] = None,
                 masking: str = "mean") -> record_shards.RecordSet:
    """Backward selection of images ``indices`` (a tuple; default all) of ``split`` with the
    base model, masked value ``masking`` (``masked_data.MASKING_VALUES``): the records in
    shards (``record_shards.RecordSet``), computed where missing; once per run."""
    key = (split, indices, masking)
    if key not in self._backselections:
      self._backselections[key] = backselect_stage.records(self, split, indices, masking)
    return self._backselections[key]

  def pixel_subsets(self) -> dict:
    """Stage subsets' masks of every test and train image (``subsets_stage.load_or_compute``:
    ``{"<kind>_<split>": mask}`` for kinds ``subsets_stage.ALL_KINDS``), computed where
    missing or invalid."""
    return subsets_stage.load_or_compute(self)

  def kept_count(self) -> int:
    """Pixels every pixel-subset keeps (``subsets_stage.kept_count``: ``subsets.frac_kept``
    of the image, in whole removal steps of stage backselect's records)."""
    return subsets_stage.kept_count(self)

  def predict_logits(self, apply, variables, images) -> np.ndarray:
    """``trained.predict_logits`` on this run's mesh, ``config.eval_batch_size`` images per
    batch, the jitted ``apply`` kept for the run: ``[N, K]`` logits of ``images``."""
    return trained.predict_logits(apply, variables, images,
                                  batch_size=int(self.config.eval_batch_size), mesh=self.mesh,
                                  compiled=self.compiled_predict)

  def fully_masked(self, split: str, kind: str, indices) -> Optional[np.ndarray]:
    """Masked values ``[len(indices), H, W, C]`` of images ``indices`` of ``split``; None
    for the mean (zeros after normalisation). Image ``i``'s values depend only on it and
    the config, so any batch of them can be computed on its own."""
    if kind == "mean":
      return None
    indices = np.asarray(indices, np.int64)
    c = self.config.controls  # read on every call: the caller's results depend on them
    seed = int(c.noise_seed) + (0 if split == "train" else 1)
    return masked_data.fully_masked_values(
        kind, self.feed(split).batch(indices)[0], seed=seed, blur_sigma=float(c.blur_sigma),
        noise_scale=float(c.noise_scale), indices=indices)

  def stage_summary_path(self, stage: str) -> str:
    return self.path("stages", f"{stage}.json")

  def load_summary(self, stage: str) -> Optional[dict]:
    return atomic.load_json(self.stage_summary_path(stage))
