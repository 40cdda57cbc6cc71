"""Hybrid backward selection: Batched Gradient SIS, then exact selection of the last
features (``hybrid_backselect``; ``exact_features`` says how many)."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from overinterp_jax import precision, sharding
from overinterp_jax.selection import records
from overinterp_jax.sis.batched import (BackselectResult, check_num_classes, exact_phase,
                                        prepare_images)
from overinterp_jax.sis.gradient import (check_gradient_args, check_remove_per_step,
                                         gradient_phase)


def exact_features(num_features: int, switch_fraction: float) -> int:
  """Features ``hybrid_backselect`` selects exactly: ``ceil(switch_fraction · d)``.

  E.g. 205 of 1,024 CIFAR pixels at 0.2. Raises ``ValueError`` unless
  ``switch_fraction`` is a number in (0, 1].
  """
  if (isinstance(switch_fraction, bool)
      or not isinstance(switch_fraction, (int, float, np.integer, np.floating))
      or not 0 < switch_fraction <= 1):
    raise ValueError(f"switch_fraction must be a number in (0, 1], got {switch_fraction!r}.")
  return records.pixels_to_keep(num_features, float(switch_fraction))


def hybrid_backselect(predict_fn: Callable, images, *, switch_fraction: float,
                      remove_per_step: int, params: Any = None, target_classes=None,
                      fully_masked=None, feature_map=None, apply_softmax: bool = True,
                      noise_std: float = 0.0, seed: int = 0, batch_size: int | None = 64,
                      eval_batch_size: int | None = None,
                      images_per_group: int | None = None,
                      memory_budget_bytes: int | None = None,
                      compute_dtype: str | None = None, mesh=None) -> BackselectResult:
  """Batched Gradient SIS, then exact backward selection of the last features.

  With ``r = exact_features(d, switch_fraction)``: Batched Gradient SIS removes
  the first ``d - r`` features of each image, ``remove_per_step`` per step (the
  last step fewer when ``d - r`` is not a multiple of it), exactly as the first
  steps of ``gradient_backselect``; then exact backward selection (as
  ``batched_backselect``: every remaining candidate scored, ties to the lowest
  feature id) ranks the ``r`` features left, starting from the image with the
  gradient's removals masked. So the last-removed features, those a pixel-subset
  or SIS keeps, are chosen exactly. Cost per image: ``ceil((d - r) / k) + 1``
  forward and backward passes plus ``r(r + 1) / 2`` model evaluations (instead of
  ``d(d + 1) / 2``). ``switch_fraction = 1`` is ``batched_backselect``, bitwise.

  The exact phase runs every image of a group together whatever features the
  gradient left it: the exact program takes a per-image ``[N, d]`` mask of the
  features present at the start and scores only those.

  Args:
    switch_fraction: in (0, 1], the fraction of the features selected exactly.
    remove_per_step: positive integer ``k``, at most ``d``.
    batch_size, noise_std, seed: the gradient phase's (``gradient_backselect``).
    eval_batch_size, images_per_group, memory_budget_bytes: the exact phase's
      (``batched_backselect``); ``memory_budget_bytes`` also sizes a ``batch_size``
      of None.
    Others as in ``batched_backselect``.

  Returns:
    ``BackselectResult``: ``order [N, d]`` the gradient's removals, then the exact
    ones; ``values [N, d]`` the target score after each removal (within a gradient
    step, the score after the whole step, as ``gradient_backselect`` records it);
    targets the class predicted on the full image unless given; original scores
    on the full image.
  """
  check_gradient_args(remove_per_step, noise_std)
  prepared = prepare_images(images, fully_masked, feature_map, target_classes)
  r = exact_features(prepared.d, switch_fraction)
  predict_fn = precision.in_compute_dtype(predict_fn, compute_dtype, params is not None)
  check_num_classes(predict_fn, params, prepared.images, prepared.targets, apply_softmax)
  check_remove_per_step(remove_per_step, prepared.d)
  mesh = mesh if mesh is not None else sharding.data_mesh()
  exact_args = dict(apply_softmax=apply_softmax, eval_batch_size=eval_batch_size,
                    images_per_group=images_per_group,
                    memory_budget_bytes=memory_budget_bytes, mesh=mesh)
  if r == prepared.d:
    return exact_phase(predict_fn, params, prepared, None, r, **exact_args)
  head = gradient_phase(predict_fn, params, prepared, prepared.d - r,
                        remove_per_step=remove_per_step, apply_softmax=apply_softmax,
                        noise_std=noise_std, seed=seed, batch_size=batch_size,
                        memory_budget_bytes=memory_budget_bytes, mesh=mesh)
  present0 = np.ones((len(head.order), prepared.d), bool)
  np.put_along_axis(present0, head.order.astype(np.int64), False, axis=1)
  # The exact phase selects for the gradient phase's targets.
  tail = exact_phase(predict_fn, params, prepared._replace(targets=head.target_classes),
                     present0, r, **exact_args)
  return BackselectResult(tail.target_classes, tail.original_scores,
                          np.concatenate([head.order, tail.order], axis=1),
                          np.concatenate([head.values, tail.values], axis=1))
