"""The reference-compatible SIS API (Carter et al. 2019's ``sufficient_input_subsets``).

``find_sis``, ``sis_collection``, ``backselect``, ``SISResult``,
``make_empty_boolean_mask*`` and ``produce_masked_inputs`` take the arguments and
return the types of the reference library, so switching is a change of import.
``f`` maps a batch ``[B, *D]`` to scores ``[B]``: a JAX-traceable ``f`` runs
compiled, any other (numpy, PyTorch, ...) on the host (``engines.score_engine``).
Two deliberate differences (docs/method.md §6): the starting check ``f >= τ`` is
made on the input *with the initial mask applied*, and an empty SIS (the fully
masked input already scores ``>= τ``) gets an all-False mask.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np

from overinterp_jax.selection import records
from overinterp_jax.sis.checks import check_threshold
from overinterp_jax.sis.engines import (TRACE, Problem, check_input_and_mask,
                                        start_and_backselect, trace_reference_score)


class SISResult(NamedTuple):
  """One SIS and the backward selection it came from.

  Fields (``m`` features present at the start, ``k`` in the SIS, mask ``M``):
    sis: ``[k, len(M)]`` int indices into the mask, last-removed first.
    ordering_over_entire_backselect: ``[m, len(M)]`` indices, first removed first.
    values_over_entire_backselect: ``[m]`` score after each removal.
    mask: ``M`` bool, True on the SIS.
  """
  sis: np.ndarray
  ordering_over_entire_backselect: np.ndarray
  values_over_entire_backselect: np.ndarray
  mask: np.ndarray

  def __len__(self) -> int:
    return int(self.sis.shape[0])

  def __eq__(self, other) -> bool:
    if not isinstance(other, SISResult):
      return False
    return all(np.array_equal(a, b) for a, b in zip(self, other))

  def __ne__(self, other) -> bool:
    return not self.__eq__(other)

  __hash__ = None  # Results hold arrays; like the reference they are unhashable.

  def approx_equal(self, other, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    """Exact on indices and mask; ``np.allclose`` on the values."""
    if not isinstance(other, SISResult):
      return False
    return (np.array_equal(self.sis, other.sis)
            and np.array_equal(self.ordering_over_entire_backselect,
                               other.ordering_over_entire_backselect)
            and np.array_equal(self.mask, other.mask)
            and self.values_over_entire_backselect.shape
            == other.values_over_entire_backselect.shape
            and np.allclose(self.values_over_entire_backselect,
                            other.values_over_entire_backselect, rtol=rtol, atol=atol))


def make_empty_boolean_mask(shape: Sequence[int]) -> np.ndarray:
  """All-True mask of ``shape`` (every feature present)."""
  return np.ones(tuple(shape), dtype=bool)


def make_empty_boolean_mask_broadcast_over_axis(shape: Sequence[int], axis) -> np.ndarray:
  """All-True mask of ``shape`` with size 1 along ``axis`` (int or tuple).

  E.g. ``(32, 32, 3)`` with ``axis=2`` gives ``(32, 32, 1)``: one feature per pixel.
  """
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  shape = list(shape)
  for a in axes:
    shape[a] = 1
  return np.ones(tuple(shape), dtype=bool)


def produce_masked_inputs(input_to_mask, fully_masked_input, batch_of_masks) -> np.ndarray:
  """``[B, *D]`` masked copies: ``where(mask, input, fully_masked)`` per mask.

  Works for any dtype (strings too). Raises ``TypeError`` unless the masks
  have exactly one more dimension (the batch) than the input.
  """
  x = np.asarray(input_to_mask)
  masks = np.asarray(batch_of_masks)
  if masks.ndim != x.ndim + 1:
    raise TypeError(
        f"batch_of_masks must have one more dimension than the input: got masks of shape "
        f"{masks.shape} for an input of shape {x.shape}.")
  return np.where(masks, x[None], np.asarray(fully_masked_input)[None])


def backselect(f: Callable, current_input, current_mask, fully_masked_input, *,
               eval_batch_size: int | None = None,
               memory_budget_bytes: int | None = None,
               engine: str = "auto"):
  """Exact backward selection over the features present in ``current_mask``.

  Args:
    f: ``[B, *D] -> [B]`` (or ``[B, 1]``) score. A JAX-traceable ``f`` runs as
      one compiled program; any other Python function (numpy, PyTorch, ...)
      is called on numpy batches on the host (``score_engine`` tells which).
    current_input: ``D`` input (any dtype on the host path, strings too).
    current_mask: ``M`` bool (or integer 0/1), broadcastable onto ``D``; True = present.
    fully_masked_input: replacement values, ``D`` or broadcastable to it.
    eval_batch_size: masked inputs per call of ``f``; by default as many as
      fit ``memory_budget_bytes``.
    engine: ``"auto"``, ``"compiled"`` or ``"host"`` (see ``score_engine``).

  Returns:
    ``(ordering, values)``: ``ordering [m, len(M)]`` int64 mask indices, first
    removed first (ties: lowest row-major index); ``values [m]`` the score
    after each removal. ``m`` is the number of present features (may be 0).

  Raises:
    ValueError: mismatched shapes, a non-boolean or non-broadcastable mask, or
      NaN/infinite scores from ``f``.
  """
  problem = check_input_and_mask(current_input, current_mask, fully_masked_input)
  if not problem.mask.any():
    return np.zeros((0, problem.mask.ndim), np.int64), np.zeros((0,), np.float32)
  _, ordering, values = start_and_backselect(
      f, problem, -math.inf, engine, eval_batch_size, memory_budget_bytes)
  return ordering, values


def find_sis(f: Callable, threshold, current_input, current_mask,
             fully_masked_input, *, engine: str = "auto", eval_batch_size: int | None = None,
             memory_budget_bytes: int | None = None) -> SISResult | None:
  """One SIS of ``current_input`` among the features present in ``current_mask``.

  Returns None when ``f`` on the masked input is below ``threshold`` or when
  no feature is present. ``threshold`` may be any finite number (``f`` is an
  arbitrary score here). The keyword arguments are ``backselect``'s. An empty
  SIS (the fully masked input already reaches ``threshold``) has ``sis`` of
  shape ``(0,)``, as in the reference library.
  """
  tau = check_threshold(threshold, probability=False)
  problem = check_input_and_mask(current_input, current_mask, fully_masked_input)
  return _find_sis(f, tau, problem, engine, eval_batch_size, memory_budget_bytes)


def _find_sis(f, tau: float, problem: Problem, engine: str, eval_batch_size,
              memory_budget_bytes, score_fn=TRACE) -> SISResult | None:
  if not problem.mask.any():
    return None
  _, ordering, values = start_and_backselect(f, problem, tau, engine, eval_batch_size,
                                             memory_budget_bytes, score_fn)
  if ordering is None:
    return None
  k = int(records.sis_length(values, tau))
  sis = ordering[len(ordering) - k:][::-1] if k else np.zeros((0,), np.int64)
  sis_mask = np.zeros(problem.mask.shape, bool)
  if k:
    sis_mask[tuple(sis.T)] = True
  return SISResult(sis=sis, ordering_over_entire_backselect=ordering,
                   values_over_entire_backselect=values, mask=sis_mask)


def sis_collection(f: Callable, threshold, initial_input, fully_masked_input,
                   initial_mask=None, *, engine: str = "auto",
                   eval_batch_size: int | None = None,
                   memory_budget_bytes: int | None = None) -> list[SISResult]:
  """Disjoint SISes: find one, mask it out permanently, repeat until none is left.

  An empty SIS (the fully masked input already scores ``>= threshold``) ends
  the collection, since every further search would return it again. The
  keyword arguments are ``backselect``'s.
  """
  tau = check_threshold(threshold, probability=False)
  x = np.asarray(initial_input)
  mask = (make_empty_boolean_mask(x.shape) if initial_mask is None
          else np.array(initial_mask, copy=True))
  problem = check_input_and_mask(x, mask, fully_masked_input)
  # One trace serves every search: f cannot change while this call runs.
  score_fn = trace_reference_score(f, problem, engine, (1,))
  collection = []
  while True:
    result = _find_sis(f, tau, problem, engine, eval_batch_size, memory_budget_bytes,
                       score_fn)
    if result is None:
      break
    if np.any(result.mask & ~problem.mask):  # would repeat forever
      raise AssertionError(f"Internal error: a SIS holds features masked before its search "
                           f"({np.argwhere(result.mask & ~problem.mask).tolist()}).")
    collection.append(result)
    if len(result) == 0:
      break
    problem = problem._replace(
        x=np.where(result.mask.reshape(problem.padded), problem.fm, problem.x),
        mask=problem.mask & ~result.mask)
  assert_sis_collection_disjoint(collection)
  return collection


def assert_sis_collection_disjoint(collection: Sequence[SISResult]) -> None:
  """``AssertionError`` when an index appears in two SISes of ``collection``."""
  seen: set[tuple[int, ...]] = set()
  for result in collection:
    for idx in map(tuple, np.asarray(result.sis).tolist()):
      if idx in seen:
        raise AssertionError(f"SIS collection is not disjoint: index {idx} appears twice.")
      seen.add(idx)
