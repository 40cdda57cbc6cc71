"""Exact backward selection as one compiled program for a batch of inputs.

At every step each input's still-present features are candidates; each
candidate removal is scored, the removal leaving the highest score wins (ties:
lowest feature id), and the step is recorded. All inputs' candidates of a step
are packed into one list of (input, feature) pairs, so the model sees full
batches of ``eval_batch`` masked inputs and only the remaining candidates are
evaluated; the remainder of a step goes through calls of ``eval_batch / 8``,
so padding wastes fewer than ``eval_batch / 8`` evaluations per step. Memory is that of one
chunk, independent of the number of features.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from overinterp_jax.selection import features

# A step's last, partly filled chunk is evaluated in calls this many times smaller.
TAIL_FRACTION = 8

# score_fn(params, masked_inputs [B, *D], rows [B] int32, targets [n] int32) -> scores [B]
ScoreFn = Callable[..., jnp.ndarray]


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
  if not jnp.issubdtype(out.dtype, jnp.floating):
    return jnp.dtype(jnp.float32)
  return out.dtype


def exact_backselect_program(score_fn: ScoreFn, *, eval_batch: int, num_steps: int,
                             mask_shape: tuple[int, ...], use_feature_map: bool,
                             shared_fully_masked: bool = False):
  """Builds ``program(params, inputs, fully_masked, present0, targets, feature_map)``.

  Program arguments (``n`` inputs, ``d`` features, mask shape ``M``):
    params: any pytree handed to ``score_fn`` unchanged.
    inputs: ``[n, *D]`` inputs.
    fully_masked: ``[n, *D]`` replacement values (only row 0 is read when
      ``shared_fully_masked``: every input has the same ones).
    present0: ``[n, d]`` bool, the features present at the start.
    targets: ``[n]`` int32 handed to ``score_fn`` (e.g. class per input).
    feature_map: ``[*M]`` int32 feature ids (ignored unless ``use_feature_map``).

  Program results:
    order: ``[n, num_steps]`` int32 feature removed at each step, first removed
      first; ``-1`` once the input has no feature left.
    values: ``[n, num_steps]`` score after that removal; NaN where order is -1.
    nonfinite: ``[n]`` bool, True if any evaluated score was NaN or infinite.
  """

  def program(params, inputs, fully_masked, present0, targets, feature_map):
    n, d = present0.shape
    dtype = _score_dtype(score_fn, params, inputs, targets, eval_batch)
    fmap = feature_map if use_feature_map else None
    feature_ids = jnp.arange(d, dtype=jnp.int32)
    image_ids = jnp.arange(n, dtype=jnp.int32)
    tail_batch = max(1, eval_batch // TAIL_FRACTION)

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
          row = jnp.minimum(jnp.searchsorted(ends, pair, side="right"), n - 1).astype(jnp.int32)
          col = jnp.where(valid, pair - starts[row], 0)
          removed = candidates[row, col]
          keep = feature_ids[None, :] != removed[:, None]
          fm_rows = fully_masked[:1] if shared_fully_masked else fully_masked[row]
          masked = features.apply_presence(
              base[row], fm_rows, features.expand_presence(keep, fmap, mask_shape))
          s = score_fn(params, masked, row, targets).astype(dtype)
          nonfinite = nonfinite.at[row].max(valid & ~jnp.isfinite(s))
          scores = scores.at[jnp.where(valid, row, n), col].set(s, mode="drop")
          return first + size, scores, nonfinite

        return body

      # Full chunks of eval_batch, then the step's remainder in chunks of
      # tail_batch: a step wastes at most tail_batch - 1 evaluations.
      full_end = total - total % eval_batch
      carry = (jnp.int32(0), jnp.full((n, d), -jnp.inf, dtype), nonfinite)
      carry = lax.while_loop(lambda c: c[0] < full_end, chunk(eval_batch), carry)
      if tail_batch < eval_batch:
        carry = lax.while_loop(lambda c: c[0] < total, chunk(tail_batch), carry)
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
