"""Exact backward selection as one compiled program for a batch of inputs.

At every step each input's still-present features are candidates; each
candidate removal is scored, the removal leaving the highest score wins (ties:
lowest feature id), and the step is recorded. All inputs' candidates of a step
are packed into one list of (input, feature) pairs, so the model sees full
batches of ``eval_batch`` masked inputs and only the remaining candidates are
evaluated; the remainder of a step goes through calls of ``eval_batch / 2``,
``/ 4`` and ``/ 8`` (each at most once, largest first, as a binary number), so
calls stay large and padding wastes fewer than ``eval_batch / 8`` evaluations
per step. Memory is that of one chunk, independent of the number of features.

``exact_backselect_program`` runs all steps as one compiled loop;
``stepped_backselect`` runs the same parts (``_step_parts``) with the loop over steps on
the host, one top-level call per step (opt-in: it was built when a model call inside a
compiled loop appeared to get one CPU core only; a later quiet-machine check found both
cores in use, docs/benchmarks.md).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from overinterp_jax.selection import features

# A step's last, partly filled chunk is evaluated in calls this many times smaller.
TAIL_FRACTION = 8


def chunk_sizes(eval_batch: int) -> tuple[int, ...]:
  """The batch sizes a program calls the score function with, largest first:
  ``eval_batch``, ``eval_batch / 2``, ... down to ``eval_batch / TAIL_FRACTION``."""
  sizes = []
  size = eval_batch
  while size >= max(1, eval_batch // TAIL_FRACTION):
    if size not in sizes:
      sizes.append(size)
    if size == 1:
      break
    size //= 2
  return tuple(sizes)

# score_fn(params, masked_inputs [B, *D], rows [B] int32, targets [n] int32) -> scores [B]
ScoreFn = Callable[..., jnp.ndarray]

def values_dtype(score_dtype):
  """The dtype selection records scores in: the score's own floating dtype
  (float64 under JAX's x64 mode), float32 for integer scores."""
  return score_dtype if jnp.issubdtype(score_dtype, jnp.floating) else jnp.dtype(jnp.float32)


def _score_dtype(score_fn, params, inputs, targets, eval_batch):
  abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
  out = jax.eval_shape(
      score_fn, jax.tree.map(abstract, params),
      jax.ShapeDtypeStruct((eval_batch,) + inputs.shape[1:], inputs.dtype),
      jax.ShapeDtypeStruct((eval_batch,), jnp.int32), abstract(targets))
  if out.shape != (eval_batch,):
    raise ValueError(
        f"The score function must map a batch [B, *D] to scores [B]; for B={eval_batch} "
        f"it returned shape {out.shape}.")
  return values_dtype(out.dtype)


def _decompose(total: int, sizes: tuple[int, ...]) -> tuple[list[int], int]:
  """``(calls, padded)``: the full calls of ``sizes[0]`` and one of each smaller size
  that fits, then how many padded calls of ``sizes[-1]`` finish ``total`` pairs."""
  calls = [sizes[0]] * (total // sizes[0])
  done = len(calls) * sizes[0]
  for size in sizes[1:]:
    if done + size <= total:
      calls.append(size)
      done += size
  return calls, -(-(total - done) // sizes[-1])


def call_schedule(total: int, sizes: tuple[int, ...]) -> list[int]:
  """The calls one step of ``total`` candidates makes, in order: full calls of
  ``sizes[0]``, then one of each smaller size that fits (the remainder in binary),
  then what is left in (padded) calls of ``sizes[-1]``."""
  calls, padded = _decompose(total, sizes)
  return calls + [sizes[-1]] * padded


class Step(NamedTuple):
  """What one step's calls share (``n`` inputs, ``d`` features).

  Fields: ``candidates [n, d]`` int32, each input's present feature ids ascending, padded
  with ``d``; ``remaining [n]`` their counts; ``ends [n]`` and ``starts [n]`` the range of
  each input's candidates in the step's list of (input, feature) pairs; ``total`` its
  length; ``base [n, *D]`` the inputs with the absent features masked.
  """
  candidates: jax.Array
  remaining: jax.Array
  ends: jax.Array
  starts: jax.Array
  total: jax.Array
  base: jax.Array


def _step_parts(score_fn: ScoreFn, mask_shape, use_feature_map: bool,
                shared_fully_masked: bool):
  """``(begin, chunk, end)``: one step of exact backward selection, in three pure parts
  that the compiled loop and the host-driven loop (``stepped_backselect``) share.

  ``begin(present, inputs, fully_masked, feature_map) -> Step``;
  ``chunk(size, params, targets, feature_map, fully_masked, step, (first, scores,
  nonfinite))`` scores the step's pairs ``first .. first + size - 1`` into ``scores
  [n, d]`` (``nonfinite [n]`` marks NaN or infinite scores) and returns the triple
  with ``first + size``;
  ``end(step, scores, present, order, values, t)`` removes each input's best candidate
  (first maximum: the lowest feature id) and records it at step ``t``.
  """
  def begin(present, inputs, fully_masked, feature_map):
    n, d = present.shape
    fmap = feature_map if use_feature_map else None
    remaining = present.sum(axis=1, dtype=jnp.int32)
    slot = jnp.where(present, jnp.cumsum(present, axis=1, dtype=jnp.int32) - 1, d)
    candidates = jnp.full((n, d), d, jnp.int32).at[jnp.arange(n)[:, None], slot].set(
        jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32), (n, d)), mode="drop")
    ends = jnp.cumsum(remaining)
    base = features.apply_presence(inputs, fully_masked,
                                   features.expand_presence(present, fmap, mask_shape))
    return Step(candidates, remaining, ends, ends - remaining, ends[-1], base)

  def chunk(size, params, targets, feature_map, fully_masked, step, carry):
    first, scores, nonfinite = carry
    n, d = scores.shape
    fmap = feature_map if use_feature_map else None
    pair = first + jnp.arange(size, dtype=jnp.int32)
    valid = pair < step.total
    if n == 1:  # one input (the reference API): broadcasts instead of gathers
      row = jnp.zeros((size,), jnp.int32)
      col = jnp.where(valid, pair, 0)
      inputs_of_rows, fm_rows = step.base[:1], fully_masked[:1]
    else:
      row = jnp.minimum(jnp.searchsorted(step.ends, pair, side="right"), n - 1).astype(jnp.int32)
      col = jnp.where(valid, pair - step.starts[row], 0)
      inputs_of_rows = step.base[row]
      fm_rows = fully_masked[:1] if shared_fully_masked else fully_masked[row]
    removed = step.candidates[row, col]
    keep = jnp.arange(d, dtype=jnp.int32)[None, :] != removed[:, None]
    masked = features.apply_presence(inputs_of_rows, fm_rows,
                                     features.expand_presence(keep, fmap, mask_shape))
    s = score_fn(params, masked, row, targets).astype(scores.dtype)
    nonfinite = nonfinite.at[row].max(valid & ~jnp.isfinite(s))
    scores = scores.at[jnp.where(valid, row, n), col].set(s, mode="drop")
    return first + size, scores, nonfinite

  def end(step, scores, present, order, values, t):
    image_ids = jnp.arange(scores.shape[0])
    best = jnp.argmax(scores, axis=1)  # first maximum = lowest id: candidates ascend
    best_feature = step.candidates[image_ids, best]
    has_any = step.remaining > 0
    order = order.at[:, t].set(jnp.where(has_any, best_feature, -1))
    values = values.at[:, t].set(jnp.where(has_any, scores[image_ids, best], jnp.nan))
    present = present.at[image_ids, best_feature].set(False, mode="drop")
    return present, order, values

  return begin, chunk, end


def _initial_records(score_fn, eval_batch, params, inputs, present0, targets, num_steps):
  """``(scores [n, d] of -inf, order [n, num_steps] of -1, values of NaN, nonfinite [n])``."""
  (n, d), dtype = present0.shape, _score_dtype(score_fn, params, inputs, targets, eval_batch)
  return (jnp.full((n, d), -jnp.inf, dtype), jnp.full((n, num_steps), -1, jnp.int32),
          jnp.full((n, num_steps), jnp.nan, dtype), jnp.zeros((n,), bool))


def exact_backselect_program(score_fn: ScoreFn, *, eval_batch: int, num_steps: int,
                             mask_shape: tuple[int, ...], use_feature_map: bool,
                             shared_fully_masked: bool = False,
                             sizes: tuple[int, ...] | None = None):
  """Builds ``program(params, inputs, fully_masked, present0, targets, feature_map)``:
  ``num_steps`` steps as one compiled loop, returning ``(order, values, nonfinite)``.

  Arguments (``n`` inputs, ``d`` features, mask shape ``M``):
    params: any pytree handed to ``score_fn`` unchanged.
    inputs: ``[n, *D]`` inputs.
    fully_masked: ``[n, *D]`` replacement values (only row 0 is read when
      ``shared_fully_masked``: every input has the same ones).
    present0: ``[n, d]`` bool, the features present at the start.
    targets: ``[n]`` int32 handed to ``score_fn`` (e.g. class per input).
    feature_map: ``[*M]`` int32 feature ids (ignored unless ``use_feature_map``).

  ``sizes``: the call sizes, largest (``eval_batch``) first; default
  ``chunk_sizes(eval_batch)``. ``(eval_batch,)`` pads every step's remainder to
  one full call: best when a call costs little next to the bookkeeping.

  Results:
    order: ``[n, num_steps]`` int32 feature removed at each step, first removed
      first; ``-1`` once the input has no feature left.
    values: ``[n, num_steps]`` score after that removal; NaN where order is -1.
    nonfinite: ``[n]`` bool, True if any evaluated score was NaN or infinite.
  """
  call_sizes = sizes or chunk_sizes(eval_batch)
  begin, chunk, end = _step_parts(score_fn, mask_shape, use_feature_map, shared_fully_masked)

  def program(params, inputs, fully_masked, present0, targets, feature_map):
    scores0, order0, values0, nonfinite0 = _initial_records(
        score_fn, eval_batch, params, inputs, present0, targets, num_steps)

    def step(t, carry):
      present, order, values, nonfinite = carry
      s = begin(present, inputs, fully_masked, feature_map)
      call = lambda size: functools.partial(chunk, size, params, targets, feature_map,
                                            fully_masked, s)
      # The calls of call_schedule(total, call_sizes), with total known only here.
      carry = (jnp.int32(0), scores0, nonfinite)
      carry = lax.while_loop(lambda c: c[0] + eval_batch <= s.total, call(eval_batch), carry)
      for size in call_sizes[1:]:
        carry = lax.cond(carry[0] + size <= s.total, call(size), lambda c: c, carry)
      carry = lax.while_loop(lambda c: c[0] < s.total, call(call_sizes[-1]), carry)
      _, scores, nonfinite = carry
      return end(s, scores, present, order, values, t) + (nonfinite,)

    carry = (present0, order0, values0, nonfinite0)
    _, order, values, nonfinite = lax.fori_loop(0, num_steps, step, carry)
    return order, values, nonfinite

  return program


def _last_calls(sizes: tuple[int, ...]) -> int:
  """The most padded calls of ``sizes[-1]`` that can end a step (1 for halving sizes)."""
  return max(_decompose(r, sizes)[1] for r in range(sizes[0]))


def stepped_backselect(score_fn: ScoreFn, *, eval_batch: int, mask_shape: tuple[int, ...],
                       use_feature_map: bool, shared_fully_masked: bool = False,
                       sizes: tuple[int, ...] | None = None):
  """Builds ``run(params, inputs, fully_masked, present0, targets, feature_map)``: the
  same selection as ``exact_backselect_program``, bit for bit, with the loop over steps
  on the host.

  Built for XLA CPU runtimes that run a model call inside a compiled loop on one thread
  (first measurement; rechecked on jaxlib 0.10.2 the loop used both cores:
  docs/benchmarks.md, "Exact backselect of one image"). Each step is one top-level call: its calls of ``call_schedule``
  as conditionals, the selection, and the next step's candidates; only a step with
  more than ``eval_batch`` candidates adds one top-level call per full chunk. The host
  knows every step's number of candidates from ``present0`` (each step removes one
  feature from each input that has any), so it never waits on the device. Steps run
  until every input is empty (``num_steps = max(present0.sum(1))``); ``run`` returns
  device arrays. Arguments and results as in ``exact_backselect_program``.
  """
  call_sizes = sizes or chunk_sizes(eval_batch)
  begin, chunk, end = _step_parts(score_fn, mask_shape, use_feature_map, shared_fully_masked)
  last_calls = _last_calls(call_sizes)

  def finish(params, targets, feature_map, fully_masked, inputs, s, first, scores, nonfinite,
             present, order, values, t):
    """The rest of step ``t`` from pair ``first`` on, its selection, the next step."""
    call = lambda size: functools.partial(chunk, size, params, targets, feature_map,
                                          fully_masked, s)
    carry = (first, scores, nonfinite)
    for size in call_sizes[1:]:
      carry = lax.cond(carry[0] + size <= s.total, call(size), lambda c: c, carry)
    for _ in range(last_calls):
      carry = lax.cond(carry[0] < s.total, call(call_sizes[-1]), lambda c: c, carry)
    present, order, values = end(s, carry[1], present, order, values, t)
    return begin(present, inputs, fully_masked, feature_map), present, order, values, carry[2]

  init = jax.jit(lambda *a: _initial_records(score_fn, eval_batch, *a), static_argnums=4)
  begin_jit = jax.jit(begin)
  full = jax.jit(functools.partial(chunk, eval_batch))
  finish = jax.jit(finish)

  def run(params, inputs, fully_masked, present0, targets, feature_map):
    counts = np.asarray(present0).sum(axis=1)
    num_steps = int(counts.max()) if counts.size else 0
    scores0, order, values, nonfinite = init(params, inputs, present0, targets, num_steps)
    present, s = present0, begin_jit(present0, inputs, fully_masked, feature_map)
    for t in range(num_steps):
      first, scores = np.int32(0), scores0
      for _ in range(int(np.maximum(counts - t, 0).sum()) // eval_batch):
        first, scores, nonfinite = full(params, targets, feature_map, fully_masked, s,
                                        (first, scores, nonfinite))
      s, present, order, values, nonfinite = finish(
          params, targets, feature_map, fully_masked, inputs, s, first, scores, nonfinite,
          present, order, values, t)
    return order, values, nonfinite

  return run

