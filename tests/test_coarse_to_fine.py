"""Coarse-to-fine backward selection: exact selection on patches places exact selection on
pixels (``sis.coarse_to_fine_backselect``)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overinterp_jax import sis
from overinterp_jax.sis import coarse_to_fine
from test_hybrid import reference_backselect

pytestmark = pytest.mark.usefixtures("fast_compile")

H, W, C, K = 8, 8, 3, 4
D = H * W


def params(seed=0):
  """Mostly positive first-layer weights: the evidence is spread over many pixels, so SISes
  at τ = 0.9 hold 11-26 of the 64 pixels."""
  rng = np.random.default_rng(seed)
  return {"w1": rng.uniform(-0.01, 0.02, size=(D * C, 16)).astype(np.float32),
          "w2": rng.normal(size=(16, K)).astype(np.float32) * 3}


def mlp(p, x):
  """``[B, 8, 8, 3] -> [B, 4]`` logits (jnp or numpy)."""
  xp = jnp if isinstance(x, jax.Array) else np
  return xp.tanh(x.reshape(x.shape[0], -1) @ p["w1"]) @ p["w2"]


def images(n, seed=1):
  """Pixels in [0, 1] at a random brightness per image (some images stay below τ = 0.9)."""
  rng = np.random.default_rng(seed)
  return (rng.uniform(0, 1, size=(n, H, W, C))
          * rng.uniform(0.2, 1, size=(n, 1, 1, 1))).astype(np.float32)


def probability(p, target):
  """The target's probability under ``mlp`` in float64 NumPy: ``[B, H, W, C] -> [B]``."""
  p64 = {k: v.astype(np.float64) for k, v in p.items()}

  def score(batch):
    z = mlp(p64, batch.astype(np.float64))
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return (e / e.sum(axis=1, keepdims=True))[:, target]
  return score


def test_pixels_alone_are_exact_selection_bitwise_and_match_a_pure_python_reference():
  p, x = params(), images(3)
  got = sis.coarse_to_fine_backselect(mlp, x, params=p, threshold=0.5, patch_sizes=(1,))
  exact = sis.batched_backselect(mlp, x, params=p)
  for a, b in zip(got, exact):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert got.order.dtype == exact.order.dtype and got.values.dtype == exact.values.dtype
  fmap = np.arange(D).reshape(H, W)
  for i in range(len(x)):
    score = probability(p, int(got.target_classes[i]))
    order, values = reference_backselect(lambda b: np.log(score(b)), x[i], np.ones(D, bool),
                                         fmap)
    np.testing.assert_array_equal(got.order[i], order)
    np.testing.assert_allclose(got.values[i], np.exp(values), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("patch_sizes,margin,min_pixels", [((4, 2, 1), 1.0, 0),
                                                           ((4, 2, 1), 1.5, 16),
                                                           ((2, 1), 1.0, 8)])
def test_every_sis_reaches_tau_and_the_record_is_a_valid_backward_selection(
    patch_sizes, margin, min_pixels):
  p, x, tau = params(), images(8), 0.9
  res, counts = sis.coarse_to_fine_backselect(
      mlp, x, params=p, threshold=tau, patch_sizes=patch_sizes, margin=margin,
      min_pixels=min_pixels, return_level_counts=True)
  assert res.order.shape == (len(x), D) and counts.shape == (len(x), len(patch_sizes))
  for row in res.order:
    np.testing.assert_array_equal(np.sort(row), np.arange(D))
  got = sis.sis_from_backselect(res, tau)
  assert got.exists.any() and not got.exists.all()  # the sample has both kinds
  np.testing.assert_array_equal(got.exists, res.original_scores >= np.float32(tau))
  masked = sis.apply_feature_mask(x, got.mask)
  probs = np.asarray(jax.nn.softmax(mlp(p, jnp.asarray(masked)), axis=-1))
  reached = probs[np.arange(len(x)), res.target_classes]
  assert np.all(reached[got.exists] >= tau * (1 - 1e-6)), reached[got.exists]
  # The last level's values are the true scores of the states it recorded; it starts from
  # a state that reaches tau wherever the full image does.
  for i in range(len(x)):
    c = int(counts[i, -1])
    score = probability(p, int(res.target_classes[i]))
    for t in sorted({D - c, D - c // 2, D} - {0}):  # removals made: states of the last level
      keep = np.ones(D, bool)
      keep[res.order[i, :t]] = False
      want = score(np.where(keep.reshape(H, W)[..., None], x[i], 0.0)[None])[0]
      have = res.values[i, t - 1] if t else res.original_scores[i]
      np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6)
    if got.exists[i]:
      start = res.values[i, D - c - 1] if c < D else res.original_scores[i]
      assert start >= np.float32(tau)
      assert got.size[i] <= c


def test_levels_start_where_the_coarser_sis_says_with_margin_and_minimum():
  p, x, tau = params(), images(6), 0.9
  res, counts = sis.coarse_to_fine_backselect(mlp, x, params=p, threshold=tau,
                                              patch_sizes=(4, 2, 1), margin=1.0,
                                              min_pixels=12, return_level_counts=True)
  np.testing.assert_array_equal(counts[:, 0], 4)   # 4 patches of 4x4 in an 8x8 image
  assert np.all(counts[:, 1] >= 3)                 # ceil(12 / 4) 2x2 patches at least
  assert np.all(counts[:, 2] >= 12)
  assert np.all(counts[:, 2] <= 4 * counts[:, 1])


def test_choose_kept_takes_the_nearest_state_that_reaches_tau():
  # state with k features present at column k; this level started with 6.
  states = np.array([[0.1, 0.2, 0.9, 0.3, 0.95, 0.2, 0.99]], np.float32)
  kept, size = coarse_to_fine.choose_kept(states, np.array([6]), 0.9, 1.0, 0)
  assert size[0] == 2 and kept[0] == 2
  kept, _ = coarse_to_fine.choose_kept(states, np.array([6]), 0.9, 1.5, 0)  # target 3
  assert kept[0] == 4           # 3 does not reach tau; 4 does
  kept, _ = coarse_to_fine.choose_kept(states, np.array([6]), 0.9, 1.0, 5)  # target 5
  assert kept[0] == 6
  none = np.array([[0.1, 0.2, 0.3]], np.float32)
  kept, size = coarse_to_fine.choose_kept(none, np.array([2]), 0.9, 1.0, 1)
  assert size[0] == 2 and kept[0] == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(patch_sizes=(3, 1)), "patch_sizes"),
    (dict(patch_sizes=(2, 4, 1)), "patch_sizes"),
    (dict(patch_sizes=(4, 2)), "patch_sizes"),
    (dict(margin=0.5), "margin"),
    (dict(min_pixels=-1), "min_pixels"),
    (dict(threshold=1.5), "threshold"),
])
def test_bad_arguments_name_the_problem(kwargs, match):
  args = dict(threshold=0.5, params=params())
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    sis.coarse_to_fine_backselect(mlp, images(2), **args)
