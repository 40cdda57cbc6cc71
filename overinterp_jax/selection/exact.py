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
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
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

# A call is split into parallel parts of at least this many inputs.
MIN_PART = 8


def parts_of(size: int, parallel: int) -> int:
  """Into how many equal parts of at least ``MIN_PART`` inputs a call of ``size`` is split
  (at most ``parallel``; 1 = not split)."""
  for parts in range(min(parallel, size // MIN_PART), 1, -1):
    if size % parts == 0:
      return parts
  return 1


def score_batch_sizes(sizes, parallel: int = 1) -> tuple[int, ...]:
  """The batch sizes a program calls the score function with, for call ``sizes``
  split into ``parallel`` parts (``parts_of``)."""
  return tuple(sorted({size // parts_of(size, parallel) for size in sizes}, reverse=True))


def split_calls(score_fn: ScoreFn, parallel: int) -> ScoreFn:
  """``score_fn`` applied to ``parts_of(B, parallel)`` consecutive parts of a batch of
  ``B`` as independent calls, concatenated.

  Inside a loop, XLA's CPU runtime runs each call of a model on one thread (at top
  level a call uses every core), but independent calls run concurrently: with one
  part per core, a step's model calls use every core again (docs/benchmarks.md).
  The model sees each input exactly as before, in a smaller batch.
  """
  if parallel <= 1:
    return score_fn

  def split(params, x, rows, targets):
    parts = parts_of(x.shape[0], parallel)
    if parts == 1:
      return score_fn(params, x, rows, targets)
    k = x.shape[0] // parts
    return jnp.concatenate([score_fn(params, x[i * k:(i + 1) * k], rows[i * k:(i + 1) * k],
                                     targets) for i in range(parts)])
  return split


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


def exact_backselect_program(score_fn: ScoreFn, *, eval_batch: int, num_steps: int,
                             mask_shape: tuple[int, ...], use_feature_map: bool,
                             shared_fully_masked: bool = False,
                             sizes: tuple[int, ...] | None = None, parallel: int = 1):
  """Builds ``program(params, inputs, fully_masked, present0, targets, feature_map)``.

  Program arguments (``n`` inputs, ``d`` features, mask shape ``M``):
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
  ``parallel``: each call is split into up to this many concurrent parts
  (``split_calls``); ``score_fn`` is called at ``score_batch_sizes(sizes, parallel)``.

  Program results:
    order: ``[n, num_steps]`` int32 feature removed at each step, first removed
      first; ``-1`` once the input has no feature left.
    values: ``[n, num_steps]`` score after that removal; NaN where order is -1.
    nonfinite: ``[n]`` bool, True if any evaluated score was NaN or infinite.
  """

  score_fn = split_calls(score_fn, parallel)

  def program(params, inputs, fully_masked, present0, targets, feature_map):
    n, d = present0.shape
    dtype = _score_dtype(score_fn, params, inputs, targets, eval_batch)
    fmap = feature_map if use_feature_map else None
    feature_ids = jnp.arange(d, dtype=jnp.int32)
    image_ids = jnp.arange(n, dtype=jnp.int32)
    call_sizes = sizes or chunk_sizes(eval_batch)

    def step(t, carry):
      present, order, values, nonfinite = carry
      remaining = present.sum(axis=1, dtype=jnp.int32)  # [n]
      # Remaining feature ids of each input, ascending, padded with d.
      slot = jnp.where(present, jnp.cumsum(present, axis=1, dtype=jnp.int32) - 1, d)
      candidates = jnp.full((n, d), d, jnp.int32).at[
          image_ids[:, None], slot].set(jnp.broadcast_to(feature_ids, (n, d)), mode="drop")
      ends = jnp.cumsum(remaining)
      starts = ends - remaining
      total = ends[-1]
      # Inputs with this step's absent features masked; a candidate masks one more.
      base = features.apply_presence(inputs, fully_masked,
                                     features.expand_presence(present, fmap, mask_shape))

      def chunk(size):
        offsets = jnp.arange(size, dtype=jnp.int32)

        def body(c):
          first, scores, nonfinite = c
          pair = first + offsets
          valid = pair < total
          if n == 1:  # one input (the reference API): broadcasts instead of gathers
            row = jnp.zeros((size,), jnp.int32)
            col = jnp.where(valid, pair, 0)
            inputs_of_rows, fm_rows = base[:1], fully_masked[:1]
          else:
            row = jnp.minimum(jnp.searchsorted(ends, pair, side="right"),
                              n - 1).astype(jnp.int32)
            col = jnp.where(valid, pair - starts[row], 0)
            inputs_of_rows = base[row]
            fm_rows = fully_masked[:1] if shared_fully_masked else fully_masked[row]
          removed = candidates[row, col]
          keep = feature_ids[None, :] != removed[:, None]
          masked = features.apply_presence(
              inputs_of_rows, fm_rows, features.expand_presence(keep, fmap, mask_shape))
          s = score_fn(params, masked, row, targets).astype(dtype)
          nonfinite = nonfinite.at[row].max(valid & ~jnp.isfinite(s))
          scores = scores.at[jnp.where(valid, row, n), col].set(s, mode="drop")
          return first + size, scores, nonfinite

        return body

      # Full chunks of eval_batch, then the remainder in one chunk of each
      # smaller size that fits, then what is left in (padded) chunks of the
      # smallest size: a step wastes fewer evaluations than the smallest size.
      carry = (jnp.int32(0), jnp.full((n, d), -jnp.inf, dtype), nonfinite)
      if len(call_sizes) > 1:  # (with one size, the last loop alone does the same calls)
        carry = lax.while_loop(lambda c: c[0] + eval_batch <= total, chunk(eval_batch), carry)
      for size in call_sizes[1:]:
        carry = lax.cond(carry[0] + size <= total, chunk(size), lambda c: c, carry)
      carry = lax.while_loop(lambda c: c[0] < total, chunk(call_sizes[-1]), carry)
      _, scores, nonfinite = carry
      # First maximum = lowest feature id, since candidates are ascending.
      best = jnp.argmax(scores, axis=1)
      best_feature = candidates[image_ids, best]
      has_any = remaining > 0
      order = order.at[:, t].set(jnp.where(has_any, best_feature, -1))
      values = values.at[:, t].set(jnp.where(has_any, scores[image_ids, best], jnp.nan))
      present = present.at[image_ids, best_feature].set(False, mode="drop")
      return present, order, values, nonfinite

    order0 = jnp.full((n, num_steps), -1, jnp.int32)
    values0 = jnp.full((n, num_steps), jnp.nan, dtype)
    carry = (present0, order0, values0, jnp.zeros((n,), bool))
    _, order, values, nonfinite = lax.fori_loop(0, num_steps, step, carry)
    return order, values, nonfinite

  return program
