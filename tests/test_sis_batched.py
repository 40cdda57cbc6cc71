"""Batched exact and gradient backward selection on tiny models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overinterp_jax import sharding, sis
from overinterp_jax.selection import exact, traced

H, W, C, K = 4, 4, 3, 5


def tiny_mlp_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"w1": jnp.asarray(rng.normal(size=(H * W * C, 16)) * 0.5, jnp.float32),
          "w2": jnp.asarray(rng.normal(size=(16, K)), jnp.float32)}


def tiny_mlp(params, x):
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"])
  return h @ params["w2"]


def images(n, seed=1):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, H, W, C)), jnp.float32)


def brute_force_backselect(predict, x, target, fmap, fully_masked=0.0):
  """Reference-structured loop: every present feature's removal, argmax, repeat."""
  d = int(fmap.max()) + 1
  present = np.ones(d, bool)
  order, values = [], []
  for _ in range(d):
    cands = np.flatnonzero(present)
    masks = np.repeat(present[None], len(cands), 0)
    masks[np.arange(len(cands)), cands] = False
    pix = masks[:, fmap][..., None]
    batch = np.where(pix, np.asarray(x)[None], np.asarray(fully_masked)[None])
    probs = np.asarray(jax.nn.softmax(predict(jnp.asarray(batch)), axis=-1))[:, target]
    best = int(np.argmax(probs))
    order.append(cands[best])
    values.append(probs[best])
    present[cands[best]] = False
  return np.array(order), np.array(values)


@pytest.mark.parametrize("eval_batch_size", [None, 5, 16, 7])
def test_exact_matches_brute_force(eval_batch_size):
  params = tiny_mlp_params()
  x = images(3)
  res = sis.batched_backselect(tiny_mlp, x, params=params, eval_batch_size=eval_batch_size)
  predict = lambda b: tiny_mlp(params, b)
  fmap = np.arange(H * W).reshape(H, W)
  assert res.order.shape == (3, H * W) and res.values.shape == (3, H * W)
  for i in range(3):
    logits = predict(x[i:i + 1])
    assert res.target_classes[i] == int(jnp.argmax(logits))
    np.testing.assert_allclose(res.original_scores[i],
                               jax.nn.softmax(logits)[0, res.target_classes[i]], rtol=1e-5)
    order, values = brute_force_backselect(predict, x[i], res.target_classes[i], fmap)
    np.testing.assert_array_equal(res.order[i], order)
    np.testing.assert_allclose(res.values[i], values, rtol=1e-5, atol=1e-6)
    assert sorted(res.order[i]) == list(range(H * W))


def test_per_image_masked_values_match_brute_force():
  params = tiny_mlp_params(5)
  x = images(3, seed=8)
  fm = images(3, seed=9)  # e.g. a blurred copy or noise: different per image
  res = sis.batched_backselect(tiny_mlp, x, params=params, fully_masked=fm, eval_batch_size=8)
  fmap = np.arange(H * W).reshape(H, W)
  for i in range(3):
    order, values = brute_force_backselect(lambda b: tiny_mlp(params, b), x[i],
                                           res.target_classes[i], fmap, fm[i])
    np.testing.assert_array_equal(res.order[i], order)
    np.testing.assert_allclose(res.values[i], values, rtol=1e-5, atol=1e-6)


def test_superpixel_feature_map_matches_brute_force():
  params = tiny_mlp_params(3)
  x = images(2, seed=4)
  fmap = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [4, 4, 4, 4]])
  res = sis.batched_backselect(tiny_mlp, x, params=params, feature_map=fmap)
  assert res.order.shape == (2, 5)
  for i in range(2):
    order, values = brute_force_backselect(lambda b: tiny_mlp(params, b), x[i],
                                           res.target_classes[i], fmap)
    np.testing.assert_array_equal(res.order[i], order)
    np.testing.assert_allclose(res.values[i], values, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 3, 5])
def test_one_and_four_devices_give_identical_results(devices, n):
  params = tiny_mlp_params()
  x = images(n, seed=7)
  one = sis.batched_backselect(tiny_mlp, x, params=params,
                               mesh=sharding.data_mesh(devices[:1]), eval_batch_size=8)
  four = sis.batched_backselect(tiny_mlp, x, params=params,
                                mesh=sharding.data_mesh(devices), eval_batch_size=8)
  for a, b in zip(one, four):
    np.testing.assert_array_equal(a, b)
  g1 = sis.gradient_backselect(tiny_mlp, x, params=params, remove_per_step=3,
                               mesh=sharding.data_mesh(devices[:1]))
  g4 = sis.gradient_backselect(tiny_mlp, x, params=params, remove_per_step=3,
                               mesh=sharding.data_mesh(devices))
  for a, b in zip(g1, g4):
    np.testing.assert_array_equal(a, b)


def test_params_committed_to_one_device_feed_a_mesh_of_four(devices):
  """Parameters restored onto one device (as a loaded checkpoint is) run every method on a
  four-device mesh (this failed with "incompatible devices") and give the results of
  parameters already on the mesh."""
  params = tiny_mlp_params()
  committed = jax.device_put(params, devices[1])
  mesh = sharding.data_mesh(devices)
  x = images(5, seed=3)
  runs = [lambda p: sis.batched_backselect(tiny_mlp, x, params=p, mesh=mesh, eval_batch_size=8),
          lambda p: sis.gradient_backselect(tiny_mlp, x, params=p, remove_per_step=3, mesh=mesh),
          lambda p: sis.hybrid_backselect(tiny_mlp, x, params=p, switch_fraction=0.5,
                                          remove_per_step=3, mesh=mesh, eval_batch_size=8)]
  for run in runs:
    for a, b in zip(run(committed), run(sharding.put_replicated(mesh, params))):
      np.testing.assert_array_equal(a, b)


def test_put_replicated_keeps_replicas_and_copies_the_rest(devices):
  mesh = sharding.data_mesh(devices)
  on_mesh = jax.device_put(np.arange(4.0), sharding.replicated(mesh))
  tree = {"mesh": on_mesh, "one": jax.device_put(np.ones(3), devices[2]), "np": np.zeros(2),
          "scalar": 1.5}
  out = sharding.put_replicated(mesh, tree)
  assert out["mesh"] is on_mesh
  assert out["scalar"] == 1.5
  for key in ("one", "np"):
    assert out[key].sharding.is_equivalent_to(sharding.replicated(mesh), 1)
    np.testing.assert_array_equal(out[key], tree[key])


def test_targeted_backselect_uses_given_class():
  params = tiny_mlp_params()
  x = images(2)
  res = sis.batched_backselect(tiny_mlp, x, params=params, target_classes=np.array([4, 0]))
  np.testing.assert_array_equal(res.target_classes, [4, 0])
  probs = jax.nn.softmax(tiny_mlp(params, x))
  np.testing.assert_allclose(res.original_scores, [probs[0, 4], probs[1, 0]], rtol=1e-5)


def test_each_step_evaluates_only_remaining_candidates():
  calls = []
  params = tiny_mlp_params()

  def counting_predict(p, b):
    jax.debug.callback(lambda: calls.append(1))
    return tiny_mlp(p, b)

  sis.batched_backselect(counting_predict, images(1), params=params, eval_batch_size=16,
                         mesh=sharding.data_mesh(jax.devices()[:1]))
  # One call for the full image; then, with r = 16 .. 1 candidates left, r // 16
  # full calls of 16, one call of 8, 4 and 2 each where it fits (the remainder
  # in binary), and what is left in padded calls of 2.
  def calls_for(r):
    n, r = r // 16, r % 16
    for size in (8, 4, 2):
      if r >= size:
        n, r = n + 1, r - size
    return n + -(-r // 2)
  assert calls_for(15) == 4 and calls_for(16) == 1 and calls_for(7) == 3
  assert len(calls) == 1 + sum(calls_for(r) for r in range(1, 17))


def test_program_compiles_once_for_repeated_calls():
  params = tiny_mlp_params()
  sis.batched_backselect(tiny_mlp, images(4, seed=2), params=params, eval_batch_size=8)
  misses = sis.programs.PROGRAMS.misses
  sis.batched_backselect(tiny_mlp, images(4, seed=3), params=params, eval_batch_size=8)
  # A new function object computing the same thing reuses the program too.
  sis.batched_backselect(lambda p, x: tiny_mlp(p, x), images(4, seed=3), params=params,
                         eval_batch_size=8)
  assert sis.programs.PROGRAMS.misses == misses
  model = sis.programs.traced_model(tiny_mlp, params, images(4), (4,) + exact.chunk_sizes(8))
  program = sis.programs.batched_exact_program(model, True, 8, 4, H * W, (H, W), True,
                                               sharding.data_mesh())
  assert program._cache_size() == 1


def test_eval_batch_shrinks_with_memory_budget():
  params = tiny_mlp_params()
  _, score, _ = sis.programs.class_score_fn(tiny_mlp, True, True)
  args = (score, traced.abstract(params), images(1), jax.ShapeDtypeStruct((1,), jnp.int32))
  small = sis.programs.eval_batch_size(*args, budget_bytes=20_000, cap=10_000)
  large = sis.programs.eval_batch_size(*args, budget_bytes=2_000_000, cap=10_000)
  assert 1 <= small < large


# Gradient backward selection ---------------------------------------------------------

def linear_scores(w):
  return lambda x: (x.reshape(x.shape[0], -1) @ w)[:, None]


def test_gradient_k1_equals_exact_on_linear_score():
  rng = np.random.default_rng(0)
  # Integer weights and inputs: removal effects are exact in float32 and some tie.
  w = jnp.asarray(rng.integers(-3, 4, size=H * W * C), jnp.float32)
  x = jnp.asarray(rng.integers(-2, 3, size=(3, H, W, C)), jnp.float32)
  predict = linear_scores(w)
  ex = sis.batched_backselect(predict, x, apply_softmax=False)
  gr = sis.gradient_backselect(predict, x, remove_per_step=1, apply_softmax=False)
  np.testing.assert_array_equal(gr.order, ex.order)
  np.testing.assert_allclose(gr.values, ex.values, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(gr.original_scores, ex.original_scores)


def test_near_certain_models_keep_their_ranking():
  """At a logit margin of ~60, softmax(z)[t] is exactly 1.0 in float32: ranking by the
  probability would tie every candidate (and its gradient would be rounding noise).
  Both methods rank by the log-probability, so they still remove the pixel whose
  contribution to the margin is smallest first."""
  rng = np.random.default_rng(3)
  x = rng.uniform(0.5, 1.5, size=(2, 4, 4, 1)).astype(np.float32)
  w = rng.uniform(1.0, 6.0, size=16).astype(np.float32)
  predict = lambda v: jnp.stack([v.reshape(v.shape[0], -1) @ w, jnp.zeros(v.shape[0])], -1)
  contribution = x.reshape(2, -1).astype(np.float64) * w
  assert np.all(contribution.sum(1) > 40)
  assert np.all(jax.nn.softmax(predict(jnp.asarray(x)))[:, 0] == 1.0)  # saturated
  expected = np.argsort(contribution, axis=1, kind="stable")
  ex = sis.batched_backselect(predict, x)
  gr = sis.gradient_backselect(predict, x, remove_per_step=1)
  np.testing.assert_array_equal(ex.order, expected)
  np.testing.assert_array_equal(gr.order, expected)
  for r in (ex, gr):
    assert np.all((r.values >= 0) & (r.values <= 1)) and np.all(r.original_scores == 1.0)
  np.testing.assert_allclose(ex.values, gr.values, rtol=1e-5)


@pytest.mark.parametrize("k", [3, 5, 16])
def test_gradient_k_steps(k):
  params = tiny_mlp_params()
  x = images(3)
  res = sis.gradient_backselect(tiny_mlp, x, params=params, remove_per_step=k)
  d = H * W
  for i in range(3):
    assert sorted(res.order[i]) == list(range(d))
    # Values are constant within a step and the last is the fully masked score.
    steps = np.repeat(np.arange(-(-d // k)), k)[:d]
    for s in np.unique(steps):
      assert np.ptp(res.values[i][steps == s]) == 0
  masked = jax.nn.softmax(tiny_mlp(params, jnp.zeros_like(x)))
  np.testing.assert_allclose(res.values[:, -1], masked[np.arange(3), res.target_classes],
                             rtol=1e-5)
  # The recorded score after step s is the model's score with those features removed.
  s = 1
  removed = np.zeros((3, d), bool)
  np.put_along_axis(removed, res.order[:, :(s + 1) * k], True, axis=1)
  kept = sis.apply_feature_mask(np.asarray(x), ~removed)
  probs = jax.nn.softmax(tiny_mlp(params, jnp.asarray(kept)))
  if (s + 1) * k <= d:
    np.testing.assert_allclose(res.values[:, (s + 1) * k - 1],
                               probs[np.arange(3), res.target_classes], rtol=1e-5)


def test_gradient_noise_is_deterministic_in_seed():
  params = tiny_mlp_params()
  x = images(2)
  a = sis.gradient_backselect(tiny_mlp, x, params=params, noise_std=1.0, seed=5)
  b = sis.gradient_backselect(tiny_mlp, x, params=params, noise_std=1.0, seed=5)
  c = sis.gradient_backselect(tiny_mlp, x, params=params, noise_std=1.0, seed=6)
  np.testing.assert_array_equal(a.order, b.order)
  assert not np.array_equal(a.order, c.order)


# From records to SISes and subsets -------------------------------------------------------

def test_sis_from_backselect_is_sufficient_and_minimal():
  params = tiny_mlp_params()
  x = images(4)
  res = sis.batched_backselect(tiny_mlp, x, params=params)
  tau = float(np.median(res.original_scores))
  batch = sis.sis_from_backselect(res, tau)
  np.testing.assert_array_equal(batch.exists, res.original_scores >= tau)
  np.testing.assert_array_equal(batch.mask.sum(1), batch.size)
  kept = sis.apply_feature_mask(np.asarray(x), batch.mask)
  probs = np.asarray(jax.nn.softmax(tiny_mlp(params, jnp.asarray(kept))))
  scores = probs[np.arange(4), res.target_classes]
  assert np.all(scores[batch.exists] >= tau - 1e-6)
  assert not batch.mask[~batch.exists].any()


def test_keep_masks():
  order = np.stack([np.random.default_rng(i).permutation(1024) for i in range(3)])
  mask = sis.keep_mask(order, 0.05)
  assert mask.shape == (3, 1024) and np.all(mask.sum(1) == 52)
  for i in range(3):
    assert set(np.flatnonzero(mask[i])) == set(order[i, -52:])
  a = sis.random_keep_mask(5, 1024, 0.05, seed=1234)
  b = sis.random_keep_mask(5, 1024, 0.05, seed=1234)
  np.testing.assert_array_equal(a, b)
  assert np.all(a.sum(1) == 52) and not np.array_equal(a[0], a[1])
  assert sis.keep_mask(order, 1.0).all()


def test_apply_feature_mask_with_superpixels():
  x = np.ones((1, 4, 4, 3), np.float32)
  fmap = np.array([[0, 0, 1, 1]] * 4)
  out = sis.apply_feature_mask(x, np.array([[True, False]]), fully_masked=-1.0,
                               feature_map=fmap)
  np.testing.assert_array_equal(out[0, :, :2], 1.0)
  np.testing.assert_array_equal(out[0, :, 2:], -1.0)


# Errors ---------------------------------------------------------------------------------

def test_errors_name_the_problem():
  params = tiny_mlp_params()
  x = images(2)
  run = lambda **kw: sis.batched_backselect(tiny_mlp, kw.pop("x", x), params=params, **kw)
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    run(x=x[0])
  with pytest.raises(ValueError, match="fully_masked"):
    run(fully_masked=np.zeros((3, 3, 3)))
  with pytest.raises(ValueError, match="integer"):
    run(feature_map=np.zeros((H, W), np.float32))
  with pytest.raises(ValueError, match="negative"):
    run(feature_map=-np.ones((H, W), np.int32))
  with pytest.raises(ValueError, match="every id used"):
    run(feature_map=np.full((H, W), 2))
  with pytest.raises(ValueError, match="feature_map has shape"):
    run(feature_map=np.zeros((2, 2), np.int32))
  with pytest.raises(ValueError, match="num_classes"):
    run(target_classes=np.array([0, K]))
  with pytest.raises(ValueError, match="target_classes"):
    run(target_classes=np.array([0]))
  with pytest.raises(ValueError, match="floating"):
    run(x=np.zeros((1, H, W, C), np.int32))
  with pytest.raises(ValueError, match="NaN or infinite"):
    run(x=x.at[1, 0, 0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="remove_per_step"):
    sis.gradient_backselect(tiny_mlp, x, params=params, remove_per_step=0)
  with pytest.raises(ValueError, match="NaN or infinite"):
    sis.gradient_backselect(tiny_mlp, x.at[0].set(jnp.inf), params=params)
  res = run()
  with pytest.raises(ValueError, match=r"threshold must be in \[0, 1\]"):
    sis.sis_from_backselect(res, 1.5)
  with pytest.raises(ValueError, match="threshold must be finite"):
    sis.sis_from_backselect(res, float("nan"))
  for bad in [0, -0.1, 1.01]:
    with pytest.raises(ValueError, match=r"frac_kept must be in \(0, 1\]"):
      sis.keep_mask(res, bad)


def test_find_sis_errors():
  f = lambda b: b.sum(-1)
  with pytest.raises(ValueError, match="fully_masked_input has shape"):
    sis.find_sis(f, 1, jnp.ones(3), np.ones(3, bool), jnp.zeros(4))
  with pytest.raises(ValueError, match="does not broadcast"):
    sis.find_sis(f, 1, jnp.ones(3), np.ones(2, bool), jnp.zeros(3))
  with pytest.raises(ValueError, match="boolean"):
    sis.find_sis(f, 1, jnp.ones(3), np.ones(3), jnp.zeros(3))
  with pytest.raises(ValueError, match=r"to \[B\] scores"):
    sis.find_sis(lambda b: b, 1, jnp.ones(3), np.ones(3, bool), jnp.zeros(3))
  with pytest.raises(ValueError, match="NaN or infinite"):
    sis.find_sis(f, 1, jnp.array([1.0, jnp.nan]), np.ones(2, bool), jnp.zeros(2))
  with pytest.raises(ValueError, match="NaN or infinite"):
    sis.find_sis(lambda b: jnp.log(b.sum(-1) - 1), -5, jnp.array([2.0, 1.0]),
                 np.ones(2, bool), jnp.zeros(2))
  with pytest.raises(ValueError, match="finite"):
    sis.find_sis(f, float("nan"), jnp.ones(3), np.ones(3, bool), jnp.zeros(3))
