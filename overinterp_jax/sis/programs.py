"""The compiled programs of the SIS API and what sizes them.

* ``PROGRAMS``: the LRU of compiled programs, keyed by what a program computes
  (``selection/traced.py``), never by a Python function object; its ``misses``
  count compilations (tests read it).
* Sizing: ``eval_batch_size`` and ``cached_eval_batch_size`` (masked inputs per
  model call that fit a memory budget, measured by XLA), ``memory_budget``.
* The batched API's scores and programs: ``log_target_probability``,
  ``class_score_fn``, ``traced_model``, ``batched_exact_program`` and
  ``batched_gradient_programs`` (sharded over images with ``shard_map``). The
  benchmarks build and time these directly.
"""
from __future__ import annotations

import collections
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from overinterp_jax import compile_cache, memory, sharding
from overinterp_jax.selection import exact, traced
from overinterp_jax.selection import gradient as gradient_steps
from overinterp_jax.sis.checks import positive_int

# Where the backend reports no free memory (the CPU); see overinterp_jax/memory.py.
DEFAULT_MEMORY_BUDGET_BYTES = memory.CPU_BUDGET_BYTES
# Bumped whenever the same inputs can give another order; stored results carry it.
# 2: candidates are ranked by the target's log-probability (``log_target_probability``).
SELECTION_VERSION = 2
# Beyond this many masked inputs per model call, throughput stops improving on
# any backend we measured, while memory keeps growing.
MAX_EVAL_BATCH = 2048
# The batch at which a score function is compiled to measure its memory.
PROBE_BATCH = 8


class ProgramCache:
  """A small LRU of compiled programs. Keys name what a program computes
  (``selection/traced.py``), never a Python function object. Across processes, JAX's
  persistent cache keeps the compiled code (``compile_cache``)."""

  def __init__(self, maxsize: int):
    self.maxsize = maxsize
    self.entries: collections.OrderedDict = collections.OrderedDict()
    self.misses = 0

  def get(self, key, build: Callable):
    if key in self.entries:
      self.entries.move_to_end(key)
      return self.entries[key]
    self.misses += 1
    compile_cache.use_persistent_cache()  # before the first compile, not at import
    value = self.entries[key] = build()
    if len(self.entries) > self.maxsize:
      self.entries.popitem(last=False)
    return value


PROGRAMS = ProgramCache(maxsize=64)


def eval_batch_size(score_fn, params, example, targets, *, budget_bytes, cap) -> int:
  """Masked inputs per model call that fit ``budget_bytes`` (measured, not guessed).

  Compiles the score function at a probe batch and reads XLA's memory
  analysis (``overinterp_jax/memory.py``); falls back to 64 input-sized
  buffers per evaluation.
  """
  input_bytes = int(np.prod(example.shape[1:])) * example.dtype.itemsize
  args_at = lambda b: (params, jax.ShapeDtypeStruct((b,) + example.shape[1:], example.dtype),
                       jax.ShapeDtypeStruct((b,), jnp.int32), targets)
  return memory.fit_batch(score_fn, args_at, budget_bytes=budget_bytes,
                          cap=min(cap, MAX_EVAL_BATCH), input_bytes=input_bytes)


def memory_budget(memory_budget_bytes, mesh=None) -> int:
  """``memory_budget_bytes``, or by default the device's (``memory.device_budget_bytes``)."""
  if memory_budget_bytes is not None:
    return positive_int("memory_budget_bytes", memory_budget_bytes)
  return memory.device_budget_bytes(mesh.devices.flat[0] if mesh is not None else None)


def cached_eval_batch_size(fn, params, example, targets, *, budget_bytes, cap) -> int:
  """``eval_batch_size`` of ``score(params, x, rows, targets)`` built on ``fn(params, x)``,
  probed once per computation (the probe compiles the model)."""
  probe = traced.trace(fn, params, example, (PROBE_BATCH,))
  apply = traced.applier(probe)

  def measure():
    score = lambda packed, x, rows, t: apply(packed[0], packed[1], x)
    return eval_batch_size(score, (traced.abstract(params), traced.abstract(probe.consts)),
                           example, targets, budget_bytes=budget_bytes, cap=cap)
  return PROGRAMS.get(("eval_batch", probe.key, example.shape, budget_bytes, cap), measure)


def log_target_probability(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """``log softmax(logits)[target]`` from logit differences: ``[B, K], [B] -> [B]``.

  ``-softplus(logsumexp_{j != t}(z_j - z_t))``. Unlike ``softmax`` in float32,
  it keeps its precision (and its gradient keeps the target logit's term) when
  the model is near-certain: at a logit margin of 20, ``softmax(z)[t]`` rounds
  to exactly 1.0, every candidate removal ties, and the gradient of the
  probability is rounding noise (measured on ResNet-20 / CIFAR-10:
  docs/results/gradient_vs_exact.md).
  """
  z = logits.astype(jnp.float32)
  is_target = jnp.arange(z.shape[1])[None, :] == targets[:, None]
  diff = z - jnp.take_along_axis(z, targets[:, None], axis=1)
  others = jnp.where(is_target, jnp.finfo(jnp.float32).min, diff)
  return -jax.nn.softplus(jax.nn.logsumexp(others, axis=1))


def class_score_fn(predict_fn, takes_params: bool, apply_softmax: bool):
  """``(class_scores, score, to_value)``.

  ``class_scores(params, x) -> [B, K]`` probabilities (or raw outputs);
  ``score(params, x, rows, targets) -> [B]`` the quantity backward selection
  ranks: the target's log-probability when ``apply_softmax`` (monotone in the
  probability, so the same order in exact arithmetic, without float32
  saturation), else the raw target output; ``to_value`` maps scores back to
  the target probabilities (or outputs) that results report.
  """
  def outputs(params, x):
    out = predict_fn(params, x) if takes_params else predict_fn(x)
    if out.ndim != 2 or out.shape[0] != x.shape[0]:
      raise ValueError(f"predict_fn must map [B, H, W, C] images to [B, num_classes] "
                       f"outputs; for B={x.shape[0]} it returned shape {out.shape}.")
    return out

  def class_scores(params, x):
    out = outputs(params, x)
    return jax.nn.softmax(out.astype(jnp.float32), axis=-1) if apply_softmax else out

  def score(params, x, rows, targets):
    if apply_softmax:
      return log_target_probability(outputs(params, x), targets[rows])
    return jnp.take_along_axis(outputs(params, x), targets[rows][:, None], axis=1)[:, 0]

  to_value = jnp.exp if apply_softmax else (lambda v: v)
  return class_scores, score, to_value


def _targets_and_start(class_scores, params, images, targets_in):
  scores = class_scores(params, images)
  targets = jnp.where(targets_in >= 0, targets_in, jnp.argmax(scores, axis=1)).astype(jnp.int32)
  start = jnp.take_along_axis(scores, targets[:, None], axis=1)[:, 0]
  return targets, start


def _grouped(per_group, group: int):
  """Applies ``per_group`` to consecutive groups of ``group`` images with ``lax.map``.

  Every image is evaluated inside a group of the same global images whatever
  the number of devices, so results are bitwise independent of it.
  """
  def run(params, feature_map, *batched):
    n = batched[0].shape[0]
    split = lambda a: a.reshape((n // group, group) + a.shape[1:])
    out = jax.lax.map(lambda args: per_group(params, feature_map, *args),
                      tuple(map(split, batched)))
    return jax.tree.map(lambda a: a.reshape((n,) + a.shape[2:]), out)
  return run


def traced_model(predict_fn, params, images, batch_sizes) -> traced.Traced:
  """``predict_fn`` (with or without ``params``) traced at the batch sizes a program uses."""
  fn = predict_fn if params is not None else (lambda _, x: predict_fn(x))
  return traced.trace(fn, params, jax.ShapeDtypeStruct(images.shape, images.dtype), batch_sizes)


def _model_predict(model: traced.Traced):
  """``predict(packed, x)`` with ``packed = (params, model.consts)``."""
  apply = traced.applier(model)
  return lambda packed, x: apply(packed[0], packed[1], x)


def batched_exact_program(model: traced.Traced, apply_softmax, eval_batch, group, d,
                          pixel_shape, shared_fully_masked, mesh, num_steps=None):
  """Sharded exact program, called with ``(params, model.consts)`` as its parameters.

  Images come with ``present0 [n, d]`` bool, the features present at the start
  (all of them in ``batched_backselect``; those the gradient phase left in
  ``hybrid_backselect``); each of ``num_steps`` (default ``d``) steps removes one.
  ``pixel_shape`` ``(H, W)`` for pixel features (no gather), None for a feature map;
  ``shared_fully_masked`` when every image has the same masked values. Cached
  on ``model.key`` (what the model computes), never on the Python function.
  """
  num_steps = d if num_steps is None else num_steps
  return PROGRAMS.get(
      ("batched_exact", model.key, apply_softmax, eval_batch, group, d, num_steps,
       pixel_shape, shared_fully_masked, mesh),
      lambda: _build_batched_exact_program(model, apply_softmax, eval_batch, group, d,
                                           num_steps, pixel_shape, shared_fully_masked, mesh))


def _build_batched_exact_program(model, apply_softmax, eval_batch, group, d, num_steps,
                                 pixel_shape, shared_fully_masked, mesh):
  class_scores, score, to_value = class_score_fn(_model_predict(model), True, apply_softmax)
  core = exact.exact_backselect_program(
      score, eval_batch=eval_batch, num_steps=num_steps, mask_shape=_mask_shape(pixel_shape),
      use_feature_map=pixel_shape is None, shared_fully_masked=shared_fully_masked)

  def per_group(params, feature_map, images, fully_masked, targets_in, present0):
    targets, start = _targets_and_start(class_scores, params, images, targets_in)
    order, values, nonfinite = core(params, images, fully_masked, present0, targets,
                                    feature_map)
    return targets, start, order, to_value(values), nonfinite | ~jnp.isfinite(start)

  return _shard_over_images(_grouped(per_group, group), mesh, num_batched_args=4)


def _mask_shape(pixel_shape):
  return None if pixel_shape is None else tuple(pixel_shape) + (1,)


def batched_gradient_programs(model: traced.Traced, apply_softmax, k, d, noise_std,
                              pixel_shape, mesh, num_removals=None):
  """Compiled, sharded ``(init, step, finish)``; each device holds one group of images.
  ``num_removals``: features removed in all (default ``d``, every one). Called with
  ``(params, model.consts)`` as parameters; cached on ``model.key``."""
  num_removals = d if num_removals is None else num_removals
  return PROGRAMS.get(
      ("batched_gradient", model.key, apply_softmax, k, d, noise_std, pixel_shape, mesh,
       num_removals),
      lambda: _build_batched_gradient_programs(model, apply_softmax, k, d, noise_std,
                                               pixel_shape, mesh, num_removals))


def _build_batched_gradient_programs(model, apply_softmax, k, d, noise_std, pixel_shape, mesh,
                                     num_removals):
  class_scores, score, to_value = class_score_fn(_model_predict(model), True, apply_softmax)
  init, step, finish_scores = gradient_steps.gradient_backselect_steps(
      score, remove_per_step=k, num_features=d, mask_shape=_mask_shape(pixel_shape),
      use_feature_map=pixel_shape is None, noise_std=noise_std, num_removals=num_removals)

  def init_group(params, feature_map, images, fully_masked, targets_in, noise_keys):
    targets, _ = _targets_and_start(class_scores, params, images, targets_in)
    const = dict(params=params, inputs=images, fully_masked=fully_masked, targets=targets,
                 feature_map=feature_map, noise_keys=noise_keys)
    return const, init(const)

  def finish(const, state):
    order, values, start, nonfinite = finish_scores(const, state)
    return order, to_value(values), to_value(start), nonfinite

  data = P(sharding.DATA_AXIS)
  const_specs = dict(params=P(), inputs=data, fully_masked=data, targets=data,
                     feature_map=P(), noise_keys=data)
  return (_jit_shard_map(init_group, mesh, (P(), P(), data, data, data, data),
                         (const_specs, data)),
          _jit_shard_map(step, mesh, (const_specs, data, P()), data, donate_argnums=1),
          _jit_shard_map(finish, mesh, (const_specs, data), data))


def _jit_shard_map(f, mesh, in_specs, out_specs, **jit_kwargs):
  return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                               check_vma=False), **jit_kwargs)


def _shard_over_images(per_device, mesh, num_batched_args: int):
  """jit(shard_map): params and the feature map replicated, images split on ``data``."""
  data = P(sharding.DATA_AXIS)
  return _jit_shard_map(per_device, mesh, (P(), P()) + (data,) * num_batched_args, data)
