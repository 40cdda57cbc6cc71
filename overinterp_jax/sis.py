"""Sufficient Input Subsets (SIS) in JAX: backward selection, FindSIS, SIS collections.

Two layers, both pure (no file I/O, no logging):

* **Reference-compatible API** — ``find_sis``, ``sis_collection``,
  ``SISResult``, ``make_empty_boolean_mask*``, ``produce_masked_inputs`` take
  the arguments and return the types of the ``sufficient_input_subsets``
  library (Carter et al. 2019), so switching is a change of import. ``f`` maps
  a batch ``[B, *D]`` to scores ``[B]``: a JAX-traceable ``f`` runs compiled, any
  other (numpy, PyTorch, ...) on the host (``score_engine``). Two
  deliberate differences (docs/method.md §6): the starting check ``f >= τ`` is
  made on the input *with the initial mask applied*, and an empty SIS (the
  fully masked input already scores ``>= τ``) gets an all-False mask.
* **Batched API for models** — ``batched_backselect`` (exact),
  ``gradient_backselect`` (Batched Gradient SIS) and ``hybrid_backselect`` (the
  gradient, then exact selection of the last features) run backward selection
  for N images at once, sharded over all local devices, and return a
  ``BackselectResult``; ``sis_from_backselect``, ``keep_mask`` and
  ``apply_feature_mask`` turn results into SISes and pixel-subsets.

Backward selection runs as one compiled program (no Python per step); see
``overinterp_jax/selection/``.
"""
from __future__ import annotations

import collections
import functools
import math
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from overinterp_jax import compile_cache, memory, precision, sharding
from overinterp_jax.selection import exact, features, gradient, host, records, traced

# Where the backend reports no free memory (the CPU); see overinterp_jax/memory.py.
DEFAULT_MEMORY_BUDGET_BYTES = memory.CPU_BUDGET_BYTES
# Bumped whenever the same inputs can give another order; stored results carry it.
# 2: candidates are ranked by the target's log-probability (``log_target_probability``).
SELECTION_VERSION = 2
# Beyond this many masked inputs per model call, throughput stops improving on
# any backend we measured, while memory keeps growing.
MAX_EVAL_BATCH = 2048

# --------------------------------------------------------------------------
# Reference-compatible API
# --------------------------------------------------------------------------


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


def _check_threshold(threshold, probability: bool) -> float:
  try:
    tau = float(threshold)
  except (TypeError, ValueError):
    raise ValueError(f"threshold must be a number, got {threshold!r}.") from None
  if not math.isfinite(tau):
    raise ValueError(f"threshold must be finite, got {threshold!r}.")
  if probability and not 0.0 <= tau <= 1.0:
    raise ValueError(f"threshold must be in [0, 1] for probability scores, got {tau}.")
  return tau


ENGINES = ("auto", "compiled", "host")


class _Problem(NamedTuple):
  """A checked reference-API input: ``x`` and ``fm`` of shape ``D``, ``mask`` of shape
  ``M`` (bool), ``padded`` = ``M`` left-padded to ``x.ndim``, ``numeric`` (JAX can hold it)."""
  x: np.ndarray
  fm: np.ndarray
  mask: np.ndarray
  padded: tuple[int, ...]
  numeric: bool


def _check_input_and_mask(current_input, current_mask, fully_masked_input) -> _Problem:
  x = np.asarray(current_input)
  numeric = x.dtype.kind in "biuf"
  if numeric:  # the precision JAX computes in: float32 unless x64 is on
    x = x.astype(jax.dtypes.canonicalize_dtype(x.dtype), copy=False)
  fm = np.asarray(fully_masked_input, dtype=x.dtype if numeric else None)
  if fm.shape != x.shape:
    try:
      fm = np.broadcast_to(fm, x.shape)
    except ValueError:
      raise ValueError(
          f"fully_masked_input has shape {fm.shape}, which does not broadcast to the "
          f"input's shape {x.shape}.") from None
  mask = np.asarray(current_mask)
  if mask.dtype != bool:
    if not (np.issubdtype(mask.dtype, np.integer) and np.isin(mask, (0, 1)).all()):
      raise ValueError(f"The mask must be boolean (or integer 0/1), got dtype {mask.dtype}"
                       + (" with values other than 0 and 1." if mask.dtype.kind in "iu" else "."))
    mask = mask.astype(bool)
  padded = features.mask_shape_for(x.shape, mask.shape)
  return _Problem(x, fm, mask, padded, numeric)


def _as_scores(out):
  """``[B]`` or ``[B, 1]`` scores as ``[B]``."""
  return out[:, 0] if jnp.ndim(out) == 2 and jnp.shape(out)[1] == 1 else out


class _ProgramCache:
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


_PROGRAMS = _ProgramCache(maxsize=64)


def _trace_reference_score(f: Callable, problem: _Problem, engine: str,
                           batch_sizes: Sequence[int]) -> traced.Traced | None:
  """``f`` traced at ``batch_sizes`` for the compiled path, or None for the host path."""
  if engine not in ENGINES:
    raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}.")
  if engine == "host":
    return None
  if not problem.numeric:
    if engine == "compiled":
      raise ValueError(f"engine='compiled' needs a numeric input, got dtype {problem.x.dtype}; "
                       "use engine='host' (or 'auto').")
    return None
  example = jax.ShapeDtypeStruct((1,) + problem.x.shape, problem.x.dtype)
  try:
    score_fn = traced.trace(lambda _, b: _as_scores(f(b)), None, example, batch_sizes)
  except Exception:
    if engine == "compiled":
      raise
    return None  # Not JAX-traceable (numpy, PyTorch, ...): the host path calls it as is.
  for b, jaxpr in zip(score_fn.batch_sizes, score_fn.jaxprs):
    shapes = [v.aval.shape for v in jaxpr.outvars]
    if shapes != [(b,)]:
      raise ValueError(f"f must map [B, *D] to [B] scores; for B={b} it returned shape "
                       f"{shapes[0] if len(shapes) == 1 else shapes}.")
  return score_fn


def score_engine(f: Callable, current_input, engine: str = "auto") -> str:
  """Which path backward selection takes for ``f``: ``"compiled"`` or ``"host"``.

  ``"auto"`` compiles ``f`` when the input is numeric and ``f`` is
  JAX-traceable (``jax.numpy`` code, a Flax model), and otherwise calls ``f``
  on numpy batches on the host (numpy, PyTorch or scikit-learn code; inputs
  of strings or tokens). Both give the same orders, values and ties.
  """
  problem = _check_input_and_mask(current_input, np.ones((), bool), current_input)
  return "host" if _trace_reference_score(f, problem, engine, (1,)) is None else "compiled"


def _eval_batch_size(score_fn, params, example, targets, *, budget_bytes, cap) -> int:
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


def _budget(memory_budget_bytes, mesh=None) -> int:
  """``memory_budget_bytes``, or by default the device's (``memory.device_budget_bytes``)."""
  if memory_budget_bytes is not None:
    return _positive_int("memory_budget_bytes", memory_budget_bytes)
  return memory.device_budget_bytes(mesh.devices.flat[0] if mesh is not None else None)


_PROBE_BATCH = 8


def _cached_eval_batch_size(fn, params, example, targets, *, budget_bytes, cap) -> int:
  """``_eval_batch_size`` of ``score(params, x, rows, targets)`` built on ``fn(params, x)``,
  probed once per computation (the probe compiles the model)."""
  probe = traced.trace(fn, params, example, (_PROBE_BATCH,))
  apply = traced.applier(probe)

  def measure():
    score = lambda packed, x, rows, t: apply(packed[0], packed[1], x)
    return _eval_batch_size(score, (traced.abstract(params), traced.abstract(probe.consts)),
                            example, targets, budget_bytes=budget_bytes, cap=cap)
  return _PROGRAMS.get(("eval_batch", probe.key, example.shape, budget_bytes, cap), measure)


def _positive_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  return int(value)


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
  problem = _check_input_and_mask(current_input, current_mask, fully_masked_input)
  if not problem.mask.any():
    return np.zeros((0, problem.mask.ndim), np.int64), np.zeros((0,), np.float32)
  _, ordering, values = _start_and_backselect(
      f, problem, -math.inf, engine, eval_batch_size, memory_budget_bytes)
  return ordering, values


_TRACE = object()  # "trace f here" (sis_collection traces once for all its searches)


def _start_and_backselect(f, problem: _Problem, tau: float, engine: str, eval_batch_size,
                          memory_budget_bytes, score_fn=_TRACE):
  """``(start, ordering, values)``: ``f`` on the masked input, then backward selection
  when ``start >= tau`` (else ``ordering`` and ``values`` are None). At least one
  feature must be present. ``score_fn``: ``f`` traced at batch 1, or None for the
  host path."""
  mask = problem.mask
  d = int(mask.size)
  memory_budget_bytes = _budget(memory_budget_bytes)
  if score_fn is _TRACE:
    score_fn = _trace_reference_score(f, problem, engine, (1,))
  if eval_batch_size is not None:
    eval_batch_size = _positive_int("eval_batch_size", eval_batch_size)
  elif score_fn is None or d * 64 * problem.x.nbytes <= memory_budget_bytes:
    # The host path, or a problem so small that no memory probe is needed.
    eval_batch_size = max(1, min(d, MAX_EVAL_BATCH,
                                 memory_budget_bytes // max(2 * problem.x.nbytes, 1)))
  else:
    score = _row_scores(f, score_fn, (_PROBE_BATCH,))
    eval_batch_size = _PROGRAMS.get(
        ("eval_batch", score_fn.key, memory_budget_bytes, d),
        lambda: _eval_batch_size(score, traced.abstract(score_fn.consts), problem.x[None],
                                 None, budget_bytes=memory_budget_bytes, cap=d))
  if score_fn is None:
    start_input = np.where(mask.reshape(problem.padded), problem.x, problem.fm)[None]
    start = host.scores_of(f, start_input)[:1]
    if not records.reaches(start, tau)[0]:
      return float(start[0]), None, None
    start = float(start[0])
    order, values = host.backselect(f, problem.x, problem.fm, mask.ravel(), problem.padded,
                                    eval_batch_size)
  else:
    start, order, values = _compiled_start_and_backselect(f, score_fn, problem, tau,
                                                          eval_batch_size)
    if order is None:
      return start, None, None
  ordering = np.stack(np.unravel_index(order, mask.shape), axis=1).astype(np.int64)
  return start, ordering, values


def _row_scores(f, score_fn: traced.Traced, batch_sizes: Sequence[int]):
  """``score(consts, x [B, *D], rows, targets) -> [B]`` for ``B`` in ``batch_sizes`` and 1.

  ``consts`` is ``score_fn.consts`` (``f`` traced at batch 1), whose digest is
  the cache key. ``f`` scores each input on its own, whatever batch it comes
  in (the reference library's contract too), so its batch-1 computation
  names its computation at every size. ``f`` is traced again at
  ``batch_sizes`` (once per compiled program); those jaxprs read the same
  closed-over arrays (checked by identity), so the batch-1 ones are passed
  for them at every call. If they do not, a batch is ``f`` mapped over its
  rows (slower for convolutions, same results).
  """
  apply1 = traced.applier(score_fn)
  row_by_row = lambda consts, x: jax.vmap(lambda xi: apply1(None, consts, xi[None])[0])(x)
  sizes = tuple(b for b in batch_sizes if b != 1)
  try:
    example = jax.ShapeDtypeStruct((1,) + score_fn.jaxprs[0].invars[-1].aval.shape[1:],
                                   score_fn.jaxprs[0].invars[-1].aval.dtype)
    batched = traced.trace(lambda _, b: _as_scores(f(b)), None, example, sizes)
    same = all(len(c) == len(score_fn.consts[0])
               and all(x is y for x, y in zip(c, score_fn.consts[0])) for c in batched.consts)
  except Exception:
    same = False
  apply = traced.applier(batched) if same and sizes else None

  def score(consts, x, rows, targets):
    if x.shape[0] == 1:
      return apply1(None, consts, x)
    if apply is None:
      return row_by_row(consts, x)
    return apply(None, consts * len(sizes), x)
  return score


CHEAP_SCORE_FLOPS = 1e4


def _flops_per_input(score_fn: traced.Traced) -> float:
  """XLA's FLOP estimate of ``f`` on one input (inf when the backend gives none)."""
  apply = traced.applier(score_fn)
  x = score_fn.jaxprs[0].invars[-1].aval
  try:
    cost = jax.jit(lambda c, b: apply(None, c, b)).lower(
        traced.abstract(score_fn.consts), jax.ShapeDtypeStruct(x.shape, x.dtype)).cost_analysis()
    return float(cost["flops"])
  except Exception:
    return math.inf


STEPS_ON_HOST_ENV = "OVERINTERP_JAX_STEPS_ON_HOST"


def steps_on_host() -> bool:
  """Whether ``backselect`` drives the steps of a costly score from the host
  (``exact.stepped_backselect``) instead of one compiled loop: only when
  ``OVERINTERP_JAX_STEPS_ON_HOST=1`` and the device is a CPU with more than one core.
  Off by default: on a quiet 2-core CPU the compiled loop was the faster of the two
  (0.54-0.58 of plain inference against 0.46-0.48, docs/benchmarks.md); results are
  the same bit for bit."""
  if os.environ.get(STEPS_ON_HOST_ENV, "").strip() != "1":
    return False
  if jax.local_devices()[0].platform != "cpu":
    return False
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return (cores or 1) > 1


def _compiled_start_and_backselect(f, score_fn: traced.Traced, problem: _Problem, tau: float,
                                   eval_batch: int):
  mask = problem.mask
  d, m = int(mask.size), int(mask.sum())
  stepped = steps_on_host()

  def build():
    # A score of a few thousand FLOPs costs less than a step's bookkeeping per
    # call: one padded call per step, in one compiled loop, beats several exact ones.
    sizes = exact.chunk_sizes(eval_batch)
    cheap = _flops_per_input(score_fn) < CHEAP_SCORE_FLOPS
    if cheap:
      sizes = sizes[:1]
    score = _row_scores(f, score_fn, sizes)
    args = dict(eval_batch=eval_batch, mask_shape=problem.padded, use_feature_map=False,
                shared_fully_masked=True, sizes=sizes)
    core = exact.exact_backselect_program(score, num_steps=d, **args)

    def start_check(consts, x, fm, present, tau):
      # tau comes in the dtype of the recorded scores: the check is made there, once.
      start = score(consts, jnp.where(present.reshape((1,) + problem.padded), x, fm),
                    None, None)[0].astype(tau.dtype)
      return start, start >= tau

    def program(consts, x, fm, present, tau):
      start, selects = start_check(consts, x, fm, present, tau)
      run = lambda _: core(consts, x, fm, present, jnp.zeros((1,), jnp.int32), None)
      skip = lambda _: jax.tree.map(jnp.zeros_like, jax.eval_shape(run, None))
      return (start, selects) + tuple(lax.cond(selects, run, skip, None))

    if cheap or not stepped:
      return jax.jit(program)
    start_check = jax.jit(start_check)
    steps = exact.stepped_backselect(score, **args)

    def host_driven(consts, x, fm, present, tau):
      start, selects = start_check(consts, x, fm, present, tau)
      if not selects:
        return start, selects, None, None, np.zeros((1,), bool)
      return (start, selects) + steps(consts, x, fm, present, jnp.zeros((1,), jnp.int32), None)

    return host_driven

  program = _PROGRAMS.get(("backselect", score_fn.key, eval_batch, d, problem.padded, stepped),
                          build)
  dtype = exact.values_dtype(score_fn.jaxprs[0].outvars[0].aval.dtype)
  start, selects, order, values, nonfinite = jax.device_get(program(
      score_fn.consts, problem.x[None], problem.fm[None], mask.reshape(1, d),
      records.threshold_in(tau, dtype)))
  start = float(start)
  if not math.isfinite(start) or bool(nonfinite[0]):
    raise ValueError("f returned NaN or infinite scores; SIS needs finite scores.")
  if not selects:  # below tau: no selection ran
    return start, None, None
  return start, np.asarray(order[0, :m]), np.asarray(values[0, :m])


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
  tau = _check_threshold(threshold, probability=False)
  problem = _check_input_and_mask(current_input, current_mask, fully_masked_input)
  return _find_sis(f, tau, problem, engine, eval_batch_size, memory_budget_bytes)


def _find_sis(f, tau: float, problem: _Problem, engine: str, eval_batch_size,
              memory_budget_bytes, score_fn=_TRACE) -> SISResult | None:
  if not problem.mask.any():
    return None
  _, ordering, values = _start_and_backselect(f, problem, tau, engine, eval_batch_size,
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
  tau = _check_threshold(threshold, probability=False)
  x = np.asarray(initial_input)
  mask = (make_empty_boolean_mask(x.shape) if initial_mask is None
          else np.array(initial_mask, copy=True))
  problem = _check_input_and_mask(x, mask, fully_masked_input)
  # One trace serves every search: f cannot change while this call runs.
  score_fn = _trace_reference_score(f, problem, engine, (1,))
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
  _assert_sis_collection_disjoint(collection)
  return collection


def _assert_sis_collection_disjoint(collection: Sequence[SISResult]) -> None:
  seen: set[tuple[int, ...]] = set()
  for result in collection:
    for idx in map(tuple, np.asarray(result.sis).tolist()):
      if idx in seen:
        raise AssertionError(f"SIS collection is not disjoint: index {idx} appears twice.")
      seen.add(idx)


# --------------------------------------------------------------------------
# Batched API for classifiers
# --------------------------------------------------------------------------


class BackselectResult(NamedTuple):
  """Backward selection of N images (``d`` features each).

  Fields:
    target_classes: ``[N]`` int32 class whose score was kept high.
    original_scores: ``[N]`` target score on the full image.
    order: ``[N, d]`` int32 feature ids, first removed first.
    values: ``[N, d]`` target score after each removal (the last entry is the
      fully masked image's score).
  """
  target_classes: np.ndarray
  original_scores: np.ndarray
  order: np.ndarray
  values: np.ndarray


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


def _class_score_fn(predict_fn, takes_params: bool, apply_softmax: bool):
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


def _traced_model(predict_fn, params, images, batch_sizes) -> traced.Traced:
  """``predict_fn`` (with or without ``params``) traced at the batch sizes a program uses."""
  fn = predict_fn if params is not None else (lambda _, x: predict_fn(x))
  return traced.trace(fn, params, jax.ShapeDtypeStruct(images.shape, images.dtype), batch_sizes)


def _model_predict(model: traced.Traced):
  """``predict(packed, x)`` with ``packed = (params, model.consts)``."""
  apply = traced.applier(model)
  return lambda packed, x: apply(packed[0], packed[1], x)


def _batched_exact_program(model: traced.Traced, apply_softmax, eval_batch, group, d,
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
  return _PROGRAMS.get(
      ("batched_exact", model.key, apply_softmax, eval_batch, group, d, num_steps,
       pixel_shape, shared_fully_masked, mesh),
      lambda: _build_batched_exact_program(model, apply_softmax, eval_batch, group, d,
                                           num_steps, pixel_shape, shared_fully_masked, mesh))


def _build_batched_exact_program(model, apply_softmax, eval_batch, group, d, num_steps,
                                 pixel_shape, shared_fully_masked, mesh):
  class_scores, score, to_value = _class_score_fn(_model_predict(model), True, apply_softmax)
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


def _batched_gradient_programs(model: traced.Traced, apply_softmax, k, d, noise_std,
                               pixel_shape, mesh, num_removals=None):
  """Compiled, sharded ``(init, step, finish)``; each device holds one group of images.
  ``num_removals``: features removed in all (default ``d``, every one). Called with
  ``(params, model.consts)`` as parameters; cached on ``model.key``."""
  num_removals = d if num_removals is None else num_removals
  return _PROGRAMS.get(
      ("batched_gradient", model.key, apply_softmax, k, d, noise_std, pixel_shape, mesh,
       num_removals),
      lambda: _build_batched_gradient_programs(model, apply_softmax, k, d, noise_std,
                                               pixel_shape, mesh, num_removals))


def _build_batched_gradient_programs(model, apply_softmax, k, d, noise_std, pixel_shape, mesh,
                                     num_removals):
  class_scores, score, to_value = _class_score_fn(_model_predict(model), True, apply_softmax)
  init, step, finish_scores = gradient.gradient_backselect_steps(
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


class _Images(NamedTuple):
  """Checked inputs of the batched API (``_prepare_images``).

  Fields: ``images [N, H, W, C]``; ``fully_masked [N, H, W, C]``; ``shared_fully_masked``
  (every image has the same masked values); ``feature_map [H, W, 1]`` int32; ``d``
  features; ``pixel_shape`` ``(H, W)`` for pixel features, else None; ``targets [N]``
  int32 (-1: the predicted class).
  """
  images: jax.Array
  fully_masked: jax.Array
  shared_fully_masked: bool
  feature_map: jax.Array
  d: int
  pixel_shape: tuple[int, int] | None
  targets: np.ndarray


def _prepare_images(images, fully_masked, feature_map, target_classes) -> _Images:
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}.")
  if images.shape[0] == 0:
    raise ValueError("images is empty (N = 0).")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be floating point (normalised), got {images.dtype}.")
  n, h, w, c = images.shape
  if fully_masked is None:
    fully_masked = jnp.zeros((h, w, c), images.dtype)
  fully_masked = jnp.asarray(fully_masked, images.dtype)
  shared_fully_masked = fully_masked.shape == (h, w, c)
  if shared_fully_masked:
    fully_masked = jnp.broadcast_to(fully_masked, images.shape)
  if fully_masked.shape != images.shape:
    raise ValueError(f"fully_masked must be [H, W, C] = {(h, w, c)} or [N, H, W, C] = "
                     f"{images.shape}, got {fully_masked.shape}.")
  pixel_shape = None
  if feature_map is None:
    feature_map = features.pixel_feature_map(h, w)
    pixel_shape = (h, w)
  fmap, d = features.validate_feature_map(feature_map, (h, w))
  if target_classes is None:
    targets = np.full((n,), -1, np.int32)
  else:
    targets = np.asarray(target_classes)
    if targets.shape != (n,) or not np.issubdtype(targets.dtype, np.integer):
      raise ValueError(f"target_classes must be [N] = [{n}] integers, got shape "
                       f"{targets.shape} and dtype {targets.dtype}.")
    if np.any(targets < 0):
      raise ValueError("target_classes must be >= 0.")
    targets = targets.astype(np.int32)
  return _Images(images, fully_masked, shared_fully_masked, jnp.asarray(fmap), d, pixel_shape,
                 targets)


# What tracing a model that is not JAX code raises (numpy's np.asarray on a tracer,
# Python control flow on its values).
_NOT_TRACEABLE = (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
                  jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError)


def _check_num_classes(predict_fn, params, images, targets, apply_softmax):
  class_scores, _, _ = _class_score_fn(predict_fn, params is not None, apply_softmax)
  try:
    out = jax.eval_shape(class_scores, traced.abstract(params),
                         jax.ShapeDtypeStruct((1,) + images.shape[1:], images.dtype))
  except _NOT_TRACEABLE as e:
    raise ValueError(
        f"predict_fn must be JAX-traceable (jax.numpy code, a Flax model's apply): tracing "
        f"it raised {type(e).__name__} ({str(e).splitlines()[0]}). For a numpy, PyTorch "
        "or other host model use sis.backselect or sis.find_sis with a score function "
        "(engine='auto' or 'host' calls it on numpy batches).") from e
  num_classes = out.shape[1]
  if np.any(targets >= num_classes):
    raise ValueError(f"target_classes must be < num_classes = {num_classes}; got "
                     f"{int(targets.max())}.")


def _run_sharded(program, mesh, group: int, params, batched: Sequence, feature_map, n):
  multiple = group * mesh.devices.size
  padded = [sharding.pad_batch(a, multiple)[0] for a in batched]
  out = program(params, feature_map, *(sharding.shard_rows(mesh, a) for a in padded))
  targets, start, order, values, nonfinite = (sharding.to_host(o)[:n] for o in out)
  _raise_if_nonfinite(nonfinite)
  return BackselectResult(targets, start, order, values)


def _raise_if_nonfinite(nonfinite: np.ndarray) -> None:
  if nonfinite.any():
    bad = np.flatnonzero(nonfinite)[:10].tolist()
    raise ValueError(f"predict_fn produced NaN or infinite scores for images {bad}; "
                     "SIS needs finite scores (check the inputs and the model).")


def batched_backselect(predict_fn: Callable, images, *, params: Any = None,
                       target_classes=None, fully_masked=None, feature_map=None,
                       apply_softmax: bool = True, eval_batch_size: int | None = None,
                       images_per_group: int | None = None,
                       memory_budget_bytes: int | None = None,
                       compute_dtype: str | None = None,
                       mesh=None) -> BackselectResult:
  """Exact backward selection of N images, sharded across devices.

  Each image's target score is ``softmax(predict_fn(x))[target]``. Every step
  evaluates every still-present feature's removal; the removal leaving the
  highest score wins (ties: lowest feature id). Cost: ``d(d+1)/2`` model
  evaluations per image, packed into calls of ``eval_batch_size``.

  Args:
    predict_fn: ``predict_fn(images [B, H, W, C]) -> logits [B, K]``, or
      ``predict_fn(params, images)`` when ``params`` is given (preferred for
      real models: parameters are then arguments, not compiled-in constants).
    images: ``[N, H, W, C]`` float, already normalised.
    params: optional pytree passed to ``predict_fn``.
    target_classes: ``[N]`` ints; default the argmax class on the full image.
    fully_masked: ``[H, W, C]`` or ``[N, H, W, C]`` masked values; default zeros
      (the dataset mean after normalisation).
    feature_map: ``[H, W]`` int feature ids ``0..d-1`` (superpixels, patches);
      default one feature per pixel (``d = H·W``, channels masked together).
    apply_softmax: False when ``predict_fn`` already returns the scores.
    eval_batch_size: masked images per model call per device; default from
      ``memory_budget_bytes`` (per device; default: half the device's free
      memory on GPUs and TPUs, 1 GiB on the CPU, ``overinterp_jax/memory.py``).
    compute_dtype: ``"float32"`` (default) or ``"bfloat16"``: the model runs
      in bfloat16 with float32 parameters, and candidates are ranked by the
      float32 log-probability of its logits (``overinterp_jax/precision.py``).
    images_per_group: images whose candidate removals are packed together into
      model calls; default enough to keep the padding of partly filled calls
      small. Groups are formed from consecutive images, independently of the
      number of devices.
    mesh: a 1-D mesh from ``overinterp_jax.sharding.data_mesh``; default every
      device (of every process, after ``jax.distributed.initialize()``).
      Results do not depend on the number of devices.

  Returns:
    ``BackselectResult`` of numpy arrays.
  """
  prepared = _prepare_images(images, fully_masked, feature_map, target_classes)
  predict_fn = precision.in_compute_dtype(predict_fn, compute_dtype, params is not None)
  _check_num_classes(predict_fn, params, prepared.images, prepared.targets, apply_softmax)
  return _exact_phase(predict_fn, params, prepared, None, prepared.d,
                      apply_softmax=apply_softmax, eval_batch_size=eval_batch_size,
                      images_per_group=images_per_group,
                      memory_budget_bytes=memory_budget_bytes, mesh=mesh)


def _exact_phase(predict_fn, params, prepared: _Images, present0, num_steps: int, *,
                 apply_softmax, eval_batch_size, images_per_group, memory_budget_bytes,
                 mesh) -> BackselectResult:
  """Exact backward selection of ``num_steps`` features of each image.

  ``present0``: ``[N, d]`` bool, the features present at the start (exactly
  ``num_steps`` per image), or None for all ``d`` of them. The others stay masked
  throughout. ``order`` and ``values`` of the result are ``[N, num_steps]``; targets
  and original scores are on the full images. Arguments as in ``batched_backselect``.
  """
  images, d = prepared.images, prepared.d
  mesh = mesh if mesh is not None else sharding.data_mesh()
  n = images.shape[0]
  if eval_batch_size is None:
    fn = predict_fn if params is not None else (lambda _, x: predict_fn(x))
    eval_batch_size = _cached_eval_batch_size(
        fn, params, images[:1], jax.ShapeDtypeStruct((1,), jnp.int32),
        budget_bytes=_budget(memory_budget_bytes, mesh), cap=n * num_steps)
  eval_batch_size = _positive_int("eval_batch_size", eval_batch_size)
  if images_per_group is None:
    # Enough images that a step's partly filled last chunk wastes <= ~1/16 of the work.
    images_per_group = min(n, -(-16 * eval_batch_size // num_steps))
  group = _positive_int("images_per_group", images_per_group)
  model = _traced_model(predict_fn, params, images,
                        (group,) + exact.chunk_sizes(eval_batch_size))
  program = _batched_exact_program(model, bool(apply_softmax), eval_batch_size, group, d,
                                   prepared.pixel_shape, prepared.shared_fully_masked, mesh,
                                   num_steps)
  present0 = np.ones((n, d), bool) if present0 is None else present0
  return _run_sharded(program, mesh, group,
                      sharding.put_replicated(mesh, (params, model.consts)),
                      [images, prepared.fully_masked, prepared.targets, present0],
                      prepared.feature_map, n)


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
  return memory.fit_batch(grad, args_at, budget_bytes=_budget(memory_budget_bytes, mesh),
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
  _check_gradient_args(remove_per_step, noise_std)
  prepared = _prepare_images(images, fully_masked, feature_map, target_classes)
  predict_fn = precision.in_compute_dtype(predict_fn, compute_dtype, params is not None)
  _check_num_classes(predict_fn, params, prepared.images, prepared.targets, apply_softmax)
  _check_remove_per_step(remove_per_step, prepared.d)
  return _gradient_phase(predict_fn, params, prepared, prepared.d,
                         remove_per_step=remove_per_step, apply_softmax=apply_softmax,
                         noise_std=noise_std, seed=seed, batch_size=batch_size,
                         memory_budget_bytes=memory_budget_bytes, mesh=mesh)


def _check_gradient_args(remove_per_step, noise_std) -> None:
  if (isinstance(remove_per_step, bool) or not isinstance(remove_per_step, (int, np.integer))
      or remove_per_step < 1):
    raise ValueError(f"remove_per_step must be a positive integer, got {remove_per_step!r}.")
  if not (math.isfinite(noise_std) and noise_std >= 0):
    raise ValueError(f"noise_std must be >= 0, got {noise_std}.")


def _check_remove_per_step(remove_per_step: int, d: int) -> None:
  if remove_per_step > d:
    raise ValueError(f"remove_per_step={remove_per_step} exceeds the {d} features.")


def _gradient_phase(predict_fn, params, prepared: _Images, num_removals: int, *,
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
  group = _positive_int("batch_size", min(n, batch_size))
  # Raw key data (uint32), so keys shard and gather like any other array.
  keys = jax.random.key_data(
      jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n)))
  model = _traced_model(predict_fn, params, images, (group,))
  init, step, finish = _batched_gradient_programs(
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
    for s in range(gradient.num_steps(num_removals, remove_per_step)):
      state = step(const, state, s)
    outputs.append((const["targets"],) + tuple(finish(const, state)))
  targets, order, values, start_scores, nonfinite = (
      np.concatenate([sharding.to_host(o[i]) for o in outputs])[:n] for i in range(5))
  _raise_if_nonfinite(nonfinite)
  return BackselectResult(targets, start_scores, order, values)


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
  _check_gradient_args(remove_per_step, noise_std)
  prepared = _prepare_images(images, fully_masked, feature_map, target_classes)
  r = exact_features(prepared.d, switch_fraction)
  predict_fn = precision.in_compute_dtype(predict_fn, compute_dtype, params is not None)
  _check_num_classes(predict_fn, params, prepared.images, prepared.targets, apply_softmax)
  _check_remove_per_step(remove_per_step, prepared.d)
  mesh = mesh if mesh is not None else sharding.data_mesh()
  exact_args = dict(apply_softmax=apply_softmax, eval_batch_size=eval_batch_size,
                    images_per_group=images_per_group,
                    memory_budget_bytes=memory_budget_bytes, mesh=mesh)
  if r == prepared.d:
    return _exact_phase(predict_fn, params, prepared, None, r, **exact_args)
  head = _gradient_phase(predict_fn, params, prepared, prepared.d - r,
                         remove_per_step=remove_per_step, apply_softmax=apply_softmax,
                         noise_std=noise_std, seed=seed, batch_size=batch_size,
                         memory_budget_bytes=memory_budget_bytes, mesh=mesh)
  present0 = np.ones((len(head.order), prepared.d), bool)
  np.put_along_axis(present0, head.order.astype(np.int64), False, axis=1)
  # The exact phase selects for the gradient phase's targets.
  tail = _exact_phase(predict_fn, params, prepared._replace(targets=head.target_classes),
                      present0, r, **exact_args)
  return BackselectResult(tail.target_classes, tail.original_scores,
                          np.concatenate([head.order, tail.order], axis=1),
                          np.concatenate([head.values, tail.values], axis=1))


# --------------------------------------------------------------------------
# From backward selection to SISes and pixel-subsets
# --------------------------------------------------------------------------


class SISBatch(NamedTuple):
  """SISes of N images at one threshold.

  Fields:
    exists: ``[N]`` bool; False where the full image scores below the threshold.
    size: ``[N]`` int SIS size in features (0 where no SIS exists).
    mask: ``[N, d]`` bool feature mask, True on the SIS.
  """
  exists: np.ndarray
  size: np.ndarray
  mask: np.ndarray


def sis_from_backselect(result: BackselectResult, threshold: float, *,
                        probability: bool = True) -> SISBatch:
  """The SIS of every image at ``threshold`` from one backward selection.

  ``probability=True`` (softmax scores) requires ``threshold`` in [0, 1].
  """
  tau = _check_threshold(threshold, probability=probability)
  values = np.asarray(result.values)
  if not np.all(np.isfinite(values)) or not np.all(np.isfinite(result.original_scores)):
    raise ValueError("The backselect result holds NaN or infinite scores.")
  exists = records.reaches(result.original_scores, tau)
  size = np.where(exists, records.sis_length(values, tau), 0)
  mask = records.keep_last_removed(result.order, size, values.shape[1])
  return SISBatch(exists=exists, size=size, mask=mask)


def keep_mask(result_or_order, frac_kept: float) -> np.ndarray:
  """``[N, d]`` bool masks keeping the last-removed ``ceil(frac_kept · d)`` features.

  ``frac_kept=0.05`` keeps 52 of 1,024 CIFAR pixels. Accepts a
  ``BackselectResult`` or its ``order`` array.
  """
  order = np.asarray(getattr(result_or_order, "order", result_or_order))
  if order.ndim != 2:
    raise ValueError(f"order must be [N, d], got shape {order.shape}.")
  d = order.shape[1]
  return records.keep_last_removed(order, records.pixels_to_keep(d, frac_kept), d)


def random_keep_mask(num_images: int, num_features: int, frac_kept: float,
                     seed: int) -> np.ndarray:
  """``[N, d]`` bool masks keeping ``ceil(frac_kept · d)`` uniformly random features.

  Deterministic in ``seed``; each image gets its own draw (the paper's random
  baseline). Uses numpy's PCG64 so subsets do not depend on the JAX backend.
  """
  k = records.pixels_to_keep(num_features, frac_kept)
  rng = np.random.default_rng(seed)
  scores = rng.random((num_images, num_features))
  kept = np.argpartition(scores, num_features - k, axis=1)[:, num_features - k:]
  mask = np.zeros((num_images, num_features), bool)
  np.put_along_axis(mask, kept, True, axis=1)
  return mask


def feature_mask_to_pixels(feature_mask, feature_map=None, spatial_shape=None) -> np.ndarray:
  """``[N, d]`` feature masks -> ``[N, H, W]`` pixel masks.

  Give ``feature_map [H, W]``, or ``spatial_shape (H, W)`` for pixel features.
  """
  feature_mask = np.asarray(feature_mask)
  if feature_map is None:
    if spatial_shape is None:
      raise ValueError("Give feature_map or spatial_shape.")
    h, w = spatial_shape
    if feature_mask.shape[1] != h * w:
      raise ValueError(f"Feature masks have {feature_mask.shape[1]} features but the "
                       f"image has {h * w} pixels.")
    return feature_mask.reshape(-1, h, w)
  fmap, d = features.validate_feature_map(feature_map, np.shape(feature_map))
  if feature_mask.shape[1] != d:
    raise ValueError(f"Feature masks have {feature_mask.shape[1]} features but the "
                     f"feature_map defines {d}.")
  return feature_mask[:, fmap[..., 0]]


def apply_feature_mask(images, feature_mask, fully_masked=None, feature_map=None):
  """Masks images: kept features stay, the rest take ``fully_masked`` (default 0).

  Args:
    images: ``[N, H, W, C]``.
    feature_mask: ``[N, d]`` bool, True = kept.
    fully_masked: ``[H, W, C]`` or ``[N, H, W, C]``; default zeros.
    feature_map: ``[H, W]`` ids; default one feature per pixel.

  Returns:
    ``[N, H, W, C]`` array of the images' type (numpy in, numpy out).
  """
  xp = np if isinstance(images, np.ndarray) else jnp
  n, h, w, _ = images.shape
  feature_mask = np.asarray(feature_mask)
  if feature_mask.ndim != 2 or feature_mask.shape[0] != n:
    raise ValueError(f"feature_mask must be [N, d] with N = {n}, got {feature_mask.shape}.")
  pixels = feature_mask_to_pixels(feature_mask, feature_map, (h, w))
  fm = xp.zeros((), images.dtype) if fully_masked is None else xp.asarray(fully_masked)
  return xp.where(xp.asarray(pixels)[..., None], images, fm)
