"""Batched Gradient SIS backward selection (paper §3): pure per-step functions.

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


def gradient_backselect_steps(score_fn, *, remove_per_step: int, num_features: int,
                              mask_shape: tuple[int, ...] | None, use_feature_map: bool,
                              noise_std: float, num_removals: int | None = None):
  """Pure ``(init, step, finish)`` functions of one group of ``n`` inputs.

  ``num_removals``: features removed in all, ``R`` (default every one, ``d``); the
  last step removes fewer than ``k`` when ``R`` is not a multiple of it. The
  caller runs ``init`` once, ``step`` for ``s = 0 .. num_steps(R, k) - 1``
  and ``finish`` once, each compiled as its own top-level program: XLA's CPU
  backend runs a forward+backward pass inside a ``while`` loop about 2.5×
  slower than at top level, and dispatch of ~d/k steps costs little.

  ``const`` is a dict of what no step changes: ``params``, ``inputs [n, *D]``,
  ``fully_masked [n, *D]``, ``targets [n]``, ``feature_map``, ``noise_keys [n, 2]``
  (raw PRNG key data, ``jax.random.key_data``).

  * ``init(const) -> state`` (removal mask, order and score buffers).
  * ``step(const, state, s) -> state``: one gradient step removing ``k`` features.
  * ``finish(const, state) -> (order [n, R] int32, values [n, R], start_scores [n],
    nonfinite [n] bool)``. ``order`` lists features first removed first (within
    a step, largest gradient first); ``values`` is the score after each step's
    removals (equal within a step; with ``R = d`` the last is the fully masked score).
  ``score_fn(params, x [n, *D], rows [n], targets) -> [n]``.
  """
  k = remove_per_step
  d = num_features
  total = d if num_removals is None else num_removals
  if not 0 < total <= d:
    raise ValueError(f"num_removals must be in [1, {d}], got {num_removals}.")
  steps = num_steps(total, k)

  def scores_of(const, m):
    m_in = features.expand_presence(
        m, const["feature_map"] if use_feature_map else None, mask_shape)
    m_in = m_in.astype(const["inputs"].dtype)
    x = const["inputs"] * (1 - m_in) + const["fully_masked"] * m_in
    rows = jnp.arange(x.shape[0], dtype=jnp.int32)
    return score_fn(const["params"], x, rows, const["targets"])

  def init(const):
    n = const["inputs"].shape[0]
    dtype = jax.eval_shape(lambda m: scores_of(const, m),
                           jax.ShapeDtypeStruct((n, d), const["inputs"].dtype)).dtype
    return dict(removed=jnp.zeros((n, d), bool), order=jnp.full((n, steps * k), -1, jnp.int32),
                scores_before=jnp.zeros((n, steps), dtype), nonfinite=jnp.zeros((n,), bool))

  def step(const, state, s):
    n = const["inputs"].shape[0]
    rows = jnp.arange(n, dtype=jnp.int32)
    score, pullback = jax.vjp(lambda m: scores_of(const, m),
                              state["removed"].astype(const["inputs"].dtype))
    # Each input's score depends on its own mask row only, so one pullback
    # of ones gives every input's gradient.
    (grad,) = pullback(jnp.ones_like(score))
    if noise_std > 0:
      noise = jax.vmap(lambda key: jax.random.normal(
          jax.random.fold_in(jax.random.wrap_key_data(key), s), (d,)))(const["noise_keys"])
      grad = grad + noise_std * noise.astype(grad.dtype)
    nonfinite = state["nonfinite"] | ~jnp.isfinite(score) | ~jnp.all(jnp.isfinite(grad), axis=1)
    grad = jnp.where(state["removed"], -jnp.inf, jnp.nan_to_num(grad))
    _, picked = lax.top_k(grad, k)  # [n, k]
    take = jnp.arange(k) < (total - s * k)
    picked = jnp.where(take, picked, -1).astype(jnp.int32)
    # Index d is out of bounds and dropped (a negative index would wrap).
    removed = state["removed"].at[rows[:, None], jnp.where(take, picked, d)].set(
        True, mode="drop")
    return dict(removed=removed, nonfinite=nonfinite,
                order=lax.dynamic_update_slice(state["order"], picked, (0, s * k)),
                scores_before=state["scores_before"].at[:, s].set(score))

  def finish(const, state):
    end_score = scores_of(const, state["removed"].astype(const["inputs"].dtype))
    nonfinite = state["nonfinite"] | ~jnp.isfinite(end_score)
    scores_after = jnp.concatenate([state["scores_before"][:, 1:], end_score[:, None]], axis=1)
    values = jnp.repeat(scores_after, k, axis=1)[:, :total]
    return state["order"][:, :total], values, state["scores_before"][:, 0], nonfinite

  return init, step, finish


def num_steps(num_features: int, remove_per_step: int) -> int:
  """Steps to remove every feature, ``k`` at a time."""
  return math.ceil(num_features / remove_per_step)
