"""The engines behind the reference-compatible API: how ``f`` is run.

``check_input_and_mask`` turns the API's arguments into a ``Problem``;
``trace_reference_score`` traces a JAX-traceable ``f`` (the compiled path) or
returns None (the host path: ``selection/host.py`` calls ``f`` on numpy batches);
``start_and_backselect`` scores the masked input and runs backward selection on
either path. Both paths give the same orders, values and ties.

``steps_on_host`` is looked up here at every call: tests and benchmarks that
compare the two compiled forms replace ``engines.steps_on_host``.
"""
from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from overinterp_jax.selection import exact, features, host, records, traced
from overinterp_jax.sis import programs
from overinterp_jax.sis.checks import positive_int

ENGINES = ("auto", "compiled", "host")


class Problem(NamedTuple):
  """A checked reference-API input: ``x`` and ``fm`` of shape ``D``, ``mask`` of shape
  ``M`` (bool), ``padded`` = ``M`` left-padded to ``x.ndim``, ``numeric`` (JAX can hold it)."""
  x: np.ndarray
  fm: np.ndarray
  mask: np.ndarray
  padded: tuple[int, ...]
  numeric: bool


def check_input_and_mask(current_input, current_mask, fully_masked_input) -> Problem:
  """The reference API's arguments checked and converted (``Problem``); ``ValueError`` for
  a fully masked input that does not broadcast or a mask that is not boolean (or 0/1)."""
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
  return Problem(x, fm, mask, padded, numeric)


def _as_scores(out):
  """``[B]`` or ``[B, 1]`` scores as ``[B]``."""
  return out[:, 0] if jnp.ndim(out) == 2 and jnp.shape(out)[1] == 1 else out


def trace_reference_score(f: Callable, problem: Problem, engine: str,
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
  problem = check_input_and_mask(current_input, np.ones((), bool), current_input)
  return "host" if trace_reference_score(f, problem, engine, (1,)) is None else "compiled"


TRACE = object()  # "trace f here" (sis_collection traces once for all its searches)


def start_and_backselect(f, problem: Problem, tau: float, engine: str, eval_batch_size,
                         memory_budget_bytes, score_fn=TRACE):
  """``(start, ordering, values)``: ``f`` on the masked input, then backward selection
  when ``start >= tau`` (else ``ordering`` and ``values`` are None). At least one
  feature must be present. ``score_fn``: ``f`` traced at batch 1, or None for the
  host path."""
  mask = problem.mask
  d = int(mask.size)
  memory_budget_bytes = programs.memory_budget(memory_budget_bytes)
  if score_fn is TRACE:
    score_fn = trace_reference_score(f, problem, engine, (1,))
  if eval_batch_size is not None:
    eval_batch_size = positive_int("eval_batch_size", eval_batch_size)
  elif score_fn is None or d * 64 * problem.x.nbytes <= memory_budget_bytes:
    # The host path, or a problem so small that no memory probe is needed.
    eval_batch_size = max(1, min(d, programs.MAX_EVAL_BATCH,
                                 memory_budget_bytes // max(2 * problem.x.nbytes, 1)))
  else:
    score = _row_scores(f, score_fn, (programs.PROBE_BATCH,))
    eval_batch_size = programs.PROGRAMS.get(
        ("eval_batch", score_fn.key, memory_budget_bytes, d),
        lambda: programs.eval_batch_size(score, traced.abstract(score_fn.consts),
                                         problem.x[None], None,
                                         budget_bytes=memory_budget_bytes, cap=d))
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


def _compiled_start_and_backselect(f, score_fn: traced.Traced, problem: Problem, tau: float,
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

  program = programs.PROGRAMS.get(
      ("backselect", score_fn.key, eval_batch, d, problem.padded, stepped), build)
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


