"""What every stage shares: config, work directory, data, mesh, and cached results.

Stages ask the context for what they build on (``base_model()``,
``backselect(split)``, ``subsets()``...); each is computed once per process
and read back from the work directory on a re-run.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import numpy as np

from overinterp_jax import config_reads
from overinterp_jax import data as data_lib
from overinterp_jax import sharding
from overinterp_jax import sis
from overinterp_jax import train
from overinterp_jax.pipeline import artifacts, backselect_stage, masked_data, shipped_base, trained


def check_train_split(config, dataset: data_lib.Dataset) -> None:
  """ValueError naming the config keys that need train images when ``dataset`` has none
  (the shipped CIFAR-10 slice): training the base model, retraining, more SIS models."""
  if len(dataset.train_images):
    return
  stages = config.stages
  needs = []
  if "train" in stages and not config.pretrained:
    needs.append("stage train without config.pretrained")
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
    self.data_fp = artifacts.fingerprint(
        config.data, dataset.train_images.shape, dataset.test_images.shape,
        artifacts.checksum({"y": dataset.train_labels, "t": dataset.test_labels}))
    check_train_split(config, dataset)
    if config.pretrained:
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
    """``train.config_augment_fn``, or None when ``config.augment.enabled`` is off."""
    return train.config_augment_fn(self.config) if self.config.augment.enabled else None

  def split_images(self, split: str) -> np.ndarray:
    return self.data.train_images if split == "train" else self.data.test_images

  def split_labels(self, split: str) -> np.ndarray:
    return self.data.train_labels if split == "train" else self.data.test_labels

  def train_model(self, name: str, config, train_images=None, test_images=None,
                  data_fp: Optional[str] = None) -> trained.Trained:
    """Trains (or loads) ``config`` in ``workdir/name`` on full or given (masked) images;
    ``data_fp`` identifies the given images (e.g. a checksum of their masks)."""
    full = train_images is None
    with config_reads.recording() as reads:  # the augmentation's reads key the model too
      return trained.ensure_trained(
          config, self.path(name),
          self.data.train_images if full else train_images, self.data.train_labels,
          self.data.test_images if full else test_images, self.data.test_labels,
          prepare=self.data.prepare if full else (lambda x: x), augment_fn=self.augment_fn,
          data_fp=self.data_fp if full else artifacts.fingerprint(self.data_fp, name, data_fp),
          mesh=self.mesh, replace_stale=name != "base_model", reads=reads)

  @functools.cached_property
  def base(self) -> trained.Trained:
    """The base model: trained in ``base_model/``, or the shipped ``config.pretrained``."""
    with self.owned_by("train"):
      if self.config.pretrained:
        base = shipped_base.load(self.config, self.data, self.mesh)
        base.key = shipped_base.fingerprint(self.config.pretrained, self.data_fp)
        return base
      return self.train_model("base_model", self.config)

  @property
  def base_fp(self) -> str:
    """What identifies the base model: its ``trained.model_key`` (or the shipped weights)."""
    return self.base.key

  @functools.lru_cache(maxsize=None)
  def backselect(self, split: str, indices: Optional[tuple] = None,
                 masking: str = "mean") -> dict:
    """Backward selection of images ``indices`` (a tuple; default all) of ``split`` with the
    base model, masked value ``masking`` (``masked_data.MASKING_VALUES``)."""
    images = self.split_images(split)
    if indices is not None:
      images = images[np.asarray(indices)]
    directory = self.path("backselect", split if masking == "mean" else f"{split}_{masking}")
    whole = masking == "mean" and indices is None  # stage backselect's, else the controls'
    with self.owned_by("backselect" if whole else self.stage), config_reads.recording() as reads:  # each shard is keyed by the reads made for it
      key = config_reads.Key(artifacts.fingerprint(
          self.base_fp, split, masking, sis.SELECTION_VERSION,
          *([] if indices is None else [list(indices)])), self.config, reads)
      fm = self.fully_masked(split, masking, indices)
      return backselect_stage.backselect_split(
          directory, self.base.apply, self.base.variables, images, self.data.prepare,
          self.config.backselect, key,
          seed=int(self.config.backselect.seed) + (0 if split == "train" else 10**7),
          fully_masked=fm, progress=self.progress, desc=f"backselect {split} ({masking})",
          mesh=self.mesh, compute_dtype=self.config.precision)

  def fully_masked(self, split: str, kind: str, indices=None):
    """Masked values ``[len(indices), H, W, C]`` of images ``indices`` (default all) of
    ``split``; None for the mean (zeros after normalisation). The last few are kept:
    the controls ask for a sample's values for its backselect and again for its subsets."""
    if kind == "mean":
      return None
    c = self.config.controls  # read on every call: the caller's results depend on them
    return self._fully_masked(split, kind, None if indices is None else tuple(
        np.asarray(indices).tolist()), int(c.noise_seed), float(c.blur_sigma),
        float(c.noise_scale))

  @functools.lru_cache(maxsize=2)
  def _fully_masked(self, split: str, kind: str, indices: Optional[tuple], noise_seed: int,
                    blur_sigma: float, noise_scale: float):
    images = self.split_images(split)
    if indices is not None:
      images = images[np.asarray(indices, np.int64)]
    seed = noise_seed + (0 if split == "train" else 1)
    return masked_data.fully_masked_values(
        kind, self.data.prepare(images), seed=seed, blur_sigma=blur_sigma,
        noise_scale=noise_scale, indices=indices)

  def stage_summary_path(self, stage: str) -> str:
    return self.path("stages", f"{stage}.json")

  def load_summary(self, stage: str) -> Optional[dict]:
    return artifacts.load_json(self.stage_summary_path(stage))
