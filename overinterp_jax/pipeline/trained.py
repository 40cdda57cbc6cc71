"""Trained models of the pipeline: train once (resumable), then load, and predict.

Every model lives in its own directory under the work directory (orbax
checkpoints with their checksums + ``metrics.jsonl`` from
``train.fit``) with a ``summary.json`` holding its test metrics
and the fingerprint of the config that trained it. A finished model is
restored, not retrained, unless its checkpoint fails its checksums: then it is
named in an error log and trained again from its last good checkpoint.
"""
from __future__ import annotations

import os
import shutil
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
from absl import logging

from overinterp_jax import config_reads, sharding, train
from overinterp_jax.data import loader
from overinterp_jax.models import InputDropout, ensemble
from overinterp_jax.store import atomic, checkpoints, hashing

def model_key(config, data_fp: str, paths) -> str:
  """The key of a model trained on data ``data_fp`` by code that read ``paths`` of
  ``config``: equal keys, equal models."""
  return hashing.fingerprint(data_fp, config_reads.values_fingerprint(config, paths))


def _matches(record: Optional[dict], config, data_fp: str) -> bool:
  """True when ``record`` (a model's ``summary.json`` or ``fingerprint.json``) is of a
  model of ``config``: same data, same values at every config path its training read,
  and no key newer than the model set away from its default."""
  return (record is not None and "config_reads" in record and "config_known" in record
          and record.get("fingerprint") == model_key(config, data_fp, record["config_reads"])
          and not config_reads.changed_new_keys(config, record["config_known"]))


def load_summary(config, workdir: str, data_fp: str) -> Optional[dict]:
  """``workdir/summary.json`` if it is of a finished model of ``config`` on ``data_fp``."""
  summary = atomic.load_json(os.path.join(workdir, "summary.json"))
  return summary if _matches(summary, config, data_fp) else None


def variant(config, overrides: dict):
  """A copy of ``config`` with the keys at some dotted paths changed
  (``{"train.num_epochs": 3}``)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for path, v in overrides.items():
      *parents, key = path.split(".")
      node = c
      for part in parents:
        node = node[part]
      if key not in node:
        raise KeyError(f"config has no key {path!r}.")
      node[key] = v
  return c


class Trained:
  """A trained model: ``module``, ``variables``, its ``metrics`` on the test data it was given,
  ``key``, what identifies it (``model_key``; results computed with it include it), and
  ``epochs``, how many it trained for (0: not known, e.g. weights from a file)."""

  def __init__(self, module, variables, metrics: dict, seconds: float, key: str = "",
               epochs: int = 0):
    self.module, self.variables, self.metrics, self.seconds = module, variables, metrics, seconds
    self.key, self.epochs = key, int(epochs)

  def apply(self, variables, images):
    """``(variables, images [B, H, W, C]) -> logits [B, K]``, eval mode, deterministic."""
    rngs = {"input_dropout": jax.random.key(train.EVAL_INPUT_DROPOUT_KEY)}
    module = self.module
    if isinstance(module, InputDropout):
      module = module.clone(per_example_masks=False)
    return module.apply(variables, images, train=False, rngs=rngs)


def ensure_trained(config, workdir: str, train_feed, test_feed, *, augment_fn, data_fp: str,
                   mesh=None, replace_stale: bool = False,
                   reads: Optional[config_reads.Reads] = None) -> Trained:
  """Trains ``config`` into ``workdir`` on ``train_feed`` (a ``data.loader.Feed``), tested on
  ``test_feed``, unless a finished model of the same config is there.

  A model is keyed by the config paths its training read and their values
  (``model_key``, in ``summary.json``), so a key that training reads can never be
  changed under a finished model. While training, ``workdir/fingerprint.json`` holds
  the paths read so far: a killed run resumes only checkpoints that the same values
  produced. A directory of another config (or of unknown origin) raises, or with
  ``replace_stale`` is deleted and retrained (models derived from other stages' results,
  e.g. retraining on changed subsets). ``reads``: a recording already open (holding
  reads made for this model before the call, e.g. of its augmentation).
  """
  view = config_reads.recording_view(config)
  summary_path = os.path.join(workdir, "summary.json")
  marker_path = os.path.join(workdir, "fingerprint.json")
  summary = load_summary(config, workdir, data_fp)
  state = None
  if summary is not None:
    config_reads.replay(summary["config_reads"])  # as if trained now
    state = train.restore_trained(view, workdir, train_feed.image_shape, len(train_feed), mesh)
  if state is None:
    stale = summary is None and (os.path.exists(summary_path) or (
        os.path.isdir(workdir) and os.listdir(workdir)
        and not _matches(atomic.load_json(marker_path), config, data_fp)))
    if stale and not replace_stale:
      raise ValueError(f"{workdir} holds a model trained under another config; use a new "
                       "--workdir or delete that directory.")
    if stale:
      logging.warning("Retraining %s: it holds a model of another config.", workdir)
      if atomic.is_writer():
        shutil.rmtree(workdir)

    def mark(paths):
      atomic.save_json(marker_path, {"fingerprint": model_key(config, data_fp, paths),
                                     "config_reads": sorted(paths), "config_known": known})

    known = config_reads.leaf_paths(config)
    reads = config_reads.Reads() if reads is None else reads
    reads.on_new = mark
    mark(reads.paths)
    t0 = time.perf_counter()
    with config_reads.recording(reads):
      state, metrics = train.fit(view, workdir, train_feed, test_feed, augment_fn=augment_fn,
                                 mesh=mesh)
    reads.on_new = None
    paths = sorted(reads.paths)
    summary = {"fingerprint": model_key(config, data_fp, paths), "config_reads": paths,
               "config_known": known, "metrics": metrics, "seconds": time.perf_counter() - t0}
    atomic.save_json(summary_path, summary)
  # What a finished stage checks before it is trusted: the same files whether the model
  # was trained now or restored (a resumed stage lost fingerprint.json and metrics.jsonl).
  for path in ([summary_path, marker_path, os.path.join(workdir, "metrics.jsonl")]
               + checkpoints.files(workdir, int(config.train.num_epochs))):
    atomic.note(path)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return Trained(train.build_model(view), variables, summary["metrics"], summary["seconds"],
                 summary["fingerprint"], int(config.train.num_epochs))


def input_dropout_apply(trained: Trained, num_samples: int, seed: int) -> Callable:
  """Deterministic ``(variables, images) -> logits`` of an input-dropout model:
  logits averaged over ``num_samples`` fixed dropout masks drawn from ``seed`` (paper §6.4)."""
  module = trained.module
  if not isinstance(module, InputDropout):
    raise ValueError("input_dropout_apply needs a model trained with input dropout.")
  shared = module.clone(per_example_masks=False, num_samples=num_samples)
  rngs = {"input_dropout": jax.random.key(seed)}
  return lambda variables, images: shared.apply(variables, images, train=False, rngs=rngs)


def ensemble_apply(apply: Callable) -> Callable:
  """``(stacked_variables, images) -> mean logits``: members share one architecture."""
  def predict(stacked, images):
    return ensemble.stacked_mean_logits(apply, stacked, images)
  return predict


def stack_variables(members) -> Any:
  """The members' variables stacked on a new leading axis, as numpy: members may live on
  different devices (a base model loaded on one device, members trained on the mesh)."""
  return jax.tree.map(lambda *leaves: np.stack([sharding.replicated_to_host(x) for x in leaves]),
                      *[m.variables for m in members])


def predict_logits(apply: Callable, variables, images, *, batch_size: int = 500,
                   mesh=None, compiled: Optional[dict] = None) -> np.ndarray:
  """``apply(variables, x)`` over ``images`` in batches -> ``[N, K]`` numpy. ``images``: a
  ``data.loader.Feed`` or array-like model inputs ``[N, ...]``. ``compiled``: where the
  jitted ``apply`` is kept for the next call (a pipeline context's ``compiled_predict``);
  None jits it for this call only."""
  mesh = mesh if mesh is not None else sharding.data_mesh()
  ndev = mesh.devices.size
  batch_size = -(-batch_size // ndev) * ndev
  fn = _compiled(apply, mesh, {} if compiled is None else compiled)
  if isinstance(images, loader.Feed):
    plan, _ = loader.eval_plan(len(images), batch_size)  # padding: the tail of the last batch
    out = [sharding.to_host(fn(variables, sharding.global_batch(mesh, x)))
           for x, _ in images.batches(plan)]
    return np.concatenate(out)[:len(images)] if out else np.zeros((0, 0), np.float32)
  mine = sharding.process_slice(batch_size)
  out = []
  for start in range(0, len(images), batch_size):
    x = np.asarray(images[start:start + batch_size], np.float32)
    n = len(x)
    x = sharding.pad_batch(x, batch_size)[0]
    logits = fn(variables, sharding.global_batch(mesh, x[mine]))
    out.append(sharding.to_host(logits)[:n])
  return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _compiled(apply, mesh, cache: dict):
  """``apply`` jitted for ``mesh``, kept in ``cache`` (held by the caller, e.g. the pipeline
  context, so it lives as long as ``apply`` is the same function)."""
  key = (apply, mesh)
  if key not in cache:
    cache[key] = jax.jit(apply, in_shardings=(sharding.replicated(mesh),
                                              sharding.batch_sharding(mesh)),
                         out_shardings=sharding.batch_sharding(mesh))
  return cache[key]


def softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def accuracy_and_confidence(logits: np.ndarray, labels: np.ndarray,
                            targets: Optional[np.ndarray] = None) -> dict:
  """Accuracy vs ``labels``; mean softmax confidence of ``targets`` (default: argmax)."""
  p = softmax(logits.astype(np.float64))
  targets = p.argmax(-1) if targets is None else targets
  conf = p[np.arange(len(p)), targets]
  return {"accuracy": float((logits.argmax(-1) == labels).mean()),
          "mean_confidence": float(conf.mean()),
          "count": int(len(labels))}
