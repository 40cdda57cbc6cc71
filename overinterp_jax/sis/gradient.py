"""Batched Gradient SIS (paper §3) of N images at once: ``gradient_backselect``.

``gradient_phase`` runs its first removals (all of them, or those ``hybrid_backselect``
leaves to the gradient); ``gradient_batch_size`` sizes its batches to the memory
budget. The per-step programs are ``programs.batched_gradient_programs``.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from overinterp_jax import memory, precision, sharding
from overinterp_jax.selection import gradient as gradient_steps
from overinterp_jax.selection import traced
from overinterp_jax.sis import programs
from overinterp_jax.sis.batched import (BackselectResult, PreparedImages, check_num_classes,
                                        prepare_images, raise_if_nonfinite)
from overinterp_jax.sis.checks import positive_int


def gradient_batch_size(predict_fn: Callable, images, *, params: Any = None, mesh=None,
                        memory_budget_bytes: int | None = None) -> int:
  """Images per device whose forward and backward pass fit the memory budget.

  Measured from XLA's memory analysis of one gradient pass of ``predict_fn``
  at a probe batch; capped at ``len(images)``.
  """
  fn = predict_fn if params is not None else (lambda _, x: predict_fn(x))
  grad = lambda p, x: jax.grad(lambda x: fn(p, x).astype(jnp.float32).sum())(x)
  shape, dtype = tuple(np.shape(images)[1:]), jnp.result_type(images)
  args_at = lambda b: (traced.abstract(params), jax.ShapeDtypeStruct((b,) + shape, dtype))
  return memory.fit_batch(grad, args_at,
                          budget_bytes=programs.memory_budget(memory_budget_bytes, mesh),
                          cap=len(images), input_bytes=int(np.prod(shape)) * dtype.itemsize)


def gradient_backselect(predict_fn: Callable, images, *, remove_per_step: int = 1,
                        params: Any = None, target_classes=None, fully_masked=None,
                        feature_map=None, apply_softmax: bool = True,
                        noise_std: float = 0.0, seed: int = 0, batch_size: int | None = 64,
                        compute_dtype: str | None = None,
                        memory_budget_bytes: int | None = None,
                        mesh=None) -> BackselectResult:
  """Batched Gradient SIS backward selection (paper §3) of N images.

  Each step takes the gradient of the target score with respect to a
  continuous per-feature removal mask and removes the ``remove_per_step``
  present features whose removal is predicted to hurt the score least.
  Cost: ``ceil(d / k) + 1`` forward and backward passes per image.

  ``values`` hold the true score after each step's removals (repeated for
  the removals of one step), so ``sis_from_backselect`` applies unchanged.
  ``noise_std > 0`` adds Gaussian noise to the gradients to break ties, drawn
  from ``seed`` and the image's position (deterministic). The public code
  uses ``k = 100`` and no noise on ImageNet. ``batch_size`` images share one
  forward and backward pass per step (per device); None chooses the largest
  that fits ``memory_budget_bytes`` (default: from the device's memory). Other
  arguments as in ``batched_backselect``.
  """
  check_gradient_args(remove_per_step, noise_std)
  prepared = prepare_images(images, fully_masked, feature_map, target_classes)
  predict_fn = precision.in_compute_dtype(predict_fn, compute_dtype, params is not None)
  check_num_classes(predict_fn, params, prepared.images, prepared.targets, apply_softmax)
  check_remove_per_step(remove_per_step, prepared.d)
  return gradient_phase(predict_fn, params, prepared, prepared.d,
                        remove_per_step=remove_per_step, apply_softmax=apply_softmax,
                        noise_std=noise_std, seed=seed, batch_size=batch_size,
                        memory_budget_bytes=memory_budget_bytes, mesh=mesh)


def check_gradient_args(remove_per_step, noise_std) -> None:
  """``ValueError`` unless ``remove_per_step`` is a positive integer and ``noise_std >= 0``."""
  if (isinstance(remove_per_step, bool) or not isinstance(remove_per_step, (int, np.integer))
      or remove_per_step < 1):
    raise ValueError(f"remove_per_step must be a positive integer, got {remove_per_step!r}.")
  if not (math.isfinite(noise_std) and noise_std >= 0):
    raise ValueError(f"noise_std must be >= 0, got {noise_std}.")


def check_remove_per_step(remove_per_step: int, d: int) -> None:
  """``ValueError`` when a step would remove more than the ``d`` features."""
  if remove_per_step > d:
    raise ValueError(f"remove_per_step={remove_per_step} exceeds the {d} features.")


def gradient_phase(predict_fn, params, prepared: PreparedImages, num_removals: int, *,
                   remove_per_step, apply_softmax, noise_std, seed, batch_size,
                   memory_budget_bytes, mesh) -> BackselectResult:
  """Batched Gradient SIS removing the first ``num_removals`` features of each image.

  ``order`` and ``values`` of the result are ``[N, num_removals]`` (all of
  ``gradient_backselect``'s when ``num_removals = d``, else its first removals);
  arguments as in ``gradient_backselect``.
  """
  images, d = prepared.images, prepared.d
  mesh = mesh if mesh is not None else sharding.data_mesh()
  n = images.shape[0]
  if batch_size is None:
    batch_size = gradient_batch_size(predict_fn, images, params=params, mesh=mesh,
                                     memory_budget_bytes=memory_budget_bytes)
  group = positive_int("batch_size", min(n, batch_size))
  # Raw key data (uint32), so keys shard and gather like any other array.
  keys = jax.random.key_data(
      jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n)))
  model = programs.traced_model(predict_fn, params, images, (group,))
  init, step, finish = programs.batched_gradient_programs(
      model, bool(apply_softmax), int(remove_per_step), d, float(noise_std),
      prepared.pixel_shape, mesh, int(num_removals))
  params = sharding.put_replicated(mesh, (params, model.consts))
  # Each round gives every device one group of consecutive images.
  per_round = group * mesh.devices.size
  batched = [sharding.pad_batch(a, per_round)[0]
             for a in (images, prepared.fully_masked, prepared.targets, keys)]
  outputs = []
  for start in range(0, batched[0].shape[0], per_round):
    const, state = init(params, prepared.feature_map,
                        *(sharding.shard_rows(mesh, a[start:start + per_round]) for a in batched))
    for s in range(gradient_steps.num_steps(num_removals, remove_per_step)):
      state = step(const, state, s)
    outputs.append((const["targets"],) + tuple(finish(const, state)))
  targets, order, values, start_scores, nonfinite = (
      np.concatenate([sharding.to_host(o[i]) for o in outputs])[:n] for i in range(5))
  raise_if_nonfinite(nonfinite)
  return BackselectResult(targets, start_scores, order, values)
