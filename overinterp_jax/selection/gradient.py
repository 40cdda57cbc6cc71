"""Batched Gradient SIS backward selection (paper §3) as one compiled program.

A continuous removal mask ``m`` (1 = removed) mixes each input with its fully
masked version, ``x_m = x·(1 - m) + fully_masked·m`` per feature. Each step
takes the gradient of the target score with respect to ``m`` (a first-order
estimate of how the score changes when a feature is removed) and removes the
``k`` present features with the largest gradient, i.e. the removals predicted
to hurt the score least. ``lax.top_k`` lists equal values lowest id first, so
with ``k = 1`` and an exactly linear score this is exact backward selection.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from overinterp_jax.selection import features


def gradient_backselect_program(score_fn, *, remove_per_step: int, num_features: int,
                                mask_shape: tuple[int, ...], use_feature_map: bool,
                                noise_std: float):
  """Builds ``program(params, inputs, fully_masked, targets, feature_map, noise_keys)``.

  Arguments: ``inputs``/``fully_masked`` ``[n, *D]``; ``targets`` ``[n]`` int32;
  ``feature_map`` ``[*M]`` int32; ``noise_keys`` ``[n]`` PRNG keys (used only
  when ``noise_std > 0``). ``score_fn(params, x [n, *D], rows [n], targets) -> [n]``.

  Results: ``order [n, d]`` int32 (first removed first; within one step the
  largest gradient first), ``values [n, d]`` the score after each step's
  removals (equal for the removals of one step; the last is the fully masked
  score), ``start_scores [n]`` the score on the unmasked input, and
  ``nonfinite [n]`` bool.
  """
  k = remove_per_step
  d = num_features
  num_steps = math.ceil(d / k)

  def program(params, inputs, fully_masked, targets, feature_map, noise_keys):
    n = inputs.shape[0]
    fmap = feature_map if use_feature_map else None
    rows = jnp.arange(n, dtype=jnp.int32)

    def scores_of(m):
      m_in = features.expand_presence(m, fmap, mask_shape).astype(inputs.dtype)
      x = inputs * (1 - m_in) + fully_masked * m_in
      return score_fn(params, x, rows, targets)

    def step(s, carry):
      removed, order, scores_before, nonfinite = carry
      m = removed.astype(inputs.dtype)
      score, pullback = jax.vjp(scores_of, m)
      # Each input's score depends on its own mask row only, so one pullback
      # of ones gives every input's gradient.
      (grad,) = pullback(jnp.ones_like(score))
      if noise_std > 0:
        noise = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, s), (d,)))(
            noise_keys)
        grad = grad + noise_std * noise.astype(grad.dtype)
      nonfinite = nonfinite | ~jnp.isfinite(score) | ~jnp.all(jnp.isfinite(grad), axis=1)
      grad = jnp.where(removed, -jnp.inf, jnp.nan_to_num(grad))
      _, picked = lax.top_k(grad, k)  # [n, k]
      take = jnp.arange(k) < (d - s * k)
      picked = jnp.where(take, picked, -1).astype(jnp.int32)
      order = lax.dynamic_update_slice(order, picked, (0, s * k))
      # Index d is out of bounds and dropped (a negative index would wrap).
      removed = removed.at[rows[:, None], jnp.where(take, picked, d)].set(True, mode="drop")
      scores_before = scores_before.at[:, s].set(score)
      return removed, order, scores_before, nonfinite

    abstract = lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a))
    dtype = jax.eval_shape(score_fn, *jax.tree.map(abstract, (params, inputs, rows, targets))).dtype
    carry = (jnp.zeros((n, d), bool), jnp.full((n, num_steps * k), -1, jnp.int32),
             jnp.zeros((n, num_steps), dtype), jnp.zeros((n,), bool))
    removed, order, scores_before, nonfinite = lax.fori_loop(0, num_steps, step, carry)
    end_score = scores_of(removed.astype(inputs.dtype))
    nonfinite = nonfinite | ~jnp.isfinite(end_score)
    scores_after = jnp.concatenate([scores_before[:, 1:], end_score[:, None]], axis=1)
    values = jnp.repeat(scores_after, k, axis=1)[:, :d]
    return order[:, :d], values, scores_before[:, 0], nonfinite

  return program
