"""Hybrid backward selection: Batched Gradient SIS, then exact selection of the last features."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overinterp_jax import config_checks, sis
from overinterp_jax.config_schema import base_config
from overinterp_jax.models import registry
from overinterp_jax.pipeline import backselect_stage, record_shards
from smoke_pipeline import run_main

pytestmark = pytest.mark.usefixtures("fast_compile")

H, W, C, K = 6, 6, 3, 5
D = H * W


def mlp_params(seed=0):
  rng = np.random.default_rng(seed)
  return {"w1": rng.normal(size=(H * W * C, 16)).astype(np.float32) * 0.5,
          "w2": rng.normal(size=(16, K)).astype(np.float32)}


def mlp(params, x):
  """A small tanh model: ``[B, H, W, C] -> [B, K]`` logits (jnp or numpy)."""
  xp = jnp if isinstance(x, jax.Array) else np
  return xp.tanh(x.reshape(x.shape[0], -1) @ params["w1"]) @ params["w2"]


def images(n, seed=1, h=H, w=W):
  return np.random.default_rng(seed).normal(size=(n, h, w, C)).astype(np.float32)


def numpy_log_prob(params, target):
  """The target's log-probability under ``mlp``, in float64 NumPy: ``[B, H, W, C] -> [B]``."""
  p64 = {k: v.astype(np.float64) for k, v in params.items()}

  def score(batch):
    z = mlp(p64, batch.astype(np.float64))
    top = z.max(axis=1, keepdims=True)
    return z[:, target] - (top[:, 0] + np.log(np.exp(z - top).sum(axis=1)))
  return score


def reference_backselect(score, x, present, fmap, fully_masked=0.0):
  """Exact backward selection of the features in ``present`` (the others masked throughout),
  one candidate at a time: ``(order, log-scores)`` of the ``present.sum()`` removals."""
  present = present.copy()
  order, values = [], []
  while present.any():
    best, best_score = -1, -math.inf
    for feature in np.flatnonzero(present):  # ascending: ties go to the lowest id
      keep = present.copy()
      keep[feature] = False
      s = float(score(np.where(keep[fmap][..., None], x, fully_masked)[None])[0])
      if s > best_score:
        best, best_score = feature, s
    order.append(best)
    values.append(best_score)
    present[best] = False
  return np.array(order), np.array(values)


def true_scores(predict, x, order, target, positions, fmap=None, fully_masked=0.0):
  """The target probability of image ``x`` with ``order[:t + 1]`` removed, per ``t``."""
  d = order.shape[0]
  keep = np.ones((len(positions), d), bool)
  for row, t in enumerate(positions):
    keep[row, order[:t + 1]] = False
  masked = sis.apply_feature_mask(np.repeat(x[None], len(positions), 0), keep,
                                  fully_masked, fmap)
  return np.asarray(jax.nn.softmax(predict(jnp.asarray(masked)), axis=-1))[:, target]


def step_ends(d, r, k):
  """Positions after which the gradient phase's steps end, then every exact position."""
  return sorted({min(e, d - r) - 1 for e in range(k, d - r + k, k)} | set(range(d - r, d)))


def test_switch_fraction_one_is_batched_backselect():
  params, x = mlp_params(), images(5)
  exact = sis.batched_backselect(mlp, x, params=params)
  hybrid = sis.hybrid_backselect(mlp, x, params=params, switch_fraction=1.0, remove_per_step=4)
  for a, b in zip(exact, hybrid):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("switch_fraction,k", [(0.3, 5), (0.25, 4), (0.05, 36)])
def test_phases_match_gradient_and_reference(switch_fraction, k):
  """d - r = 25 (5 steps of 5), 27 (6 of 4, then one of 3), 34 (one step, k > d - r)."""
  params, x = mlp_params(2), images(3, seed=3)
  r = math.ceil(switch_fraction * D)
  hybrid = sis.hybrid_backselect(mlp, x, params=params, switch_fraction=switch_fraction,
                                 remove_per_step=k)
  grad = sis.gradient_backselect(mlp, x, params=params, remove_per_step=k)
  assert hybrid.order.shape == hybrid.values.shape == (3, D)
  np.testing.assert_array_equal(np.sort(hybrid.order, axis=1), np.tile(np.arange(D), (3, 1)))
  np.testing.assert_array_equal(hybrid.target_classes, grad.target_classes)
  np.testing.assert_allclose(hybrid.original_scores, grad.original_scores, rtol=1e-6)
  # The gradient phase: gradient_backselect's first d - r removals and its full steps' values.
  np.testing.assert_array_equal(hybrid.order[:, :D - r], grad.order[:, :D - r])
  full = (D - r) // k * k
  np.testing.assert_allclose(hybrid.values[:, :full], grad.values[:, :full], rtol=1e-6)
  # The exact phase: an independent reference on the partially masked image.
  fmap = np.arange(D).reshape(H, W)
  for i in range(3):
    present = np.ones(D, bool)
    present[hybrid.order[i, :D - r]] = False
    order, log_scores = reference_backselect(
        numpy_log_prob(params, hybrid.target_classes[i]), x[i], present, fmap)
    np.testing.assert_array_equal(hybrid.order[i, D - r:], order)
    np.testing.assert_allclose(hybrid.values[i, D - r:], np.exp(log_scores), rtol=1e-5)


def test_values_are_the_true_scores():
  params, x = mlp_params(4), images(2, seed=5)
  k, switch = 3, 0.2
  r = math.ceil(switch * D)
  hybrid = sis.hybrid_backselect(mlp, x, params=params, switch_fraction=switch,
                                 remove_per_step=k)
  positions = step_ends(D, r, k)
  for i in range(2):
    want = true_scores(lambda b: mlp(params, b), x[i], hybrid.order[i],
                       hybrid.target_classes[i], positions)
    np.testing.assert_allclose(hybrid.values[i, positions], want, rtol=1e-5, atol=1e-7)
    # Within a gradient step every removal carries the value after the whole step.
    steps = np.arange(D - r) // k
    for s in np.unique(steps):
      assert np.all(hybrid.values[i, :D - r][steps == s] == hybrid.values[i, :D - r][steps == s][-1])


@pytest.fixture(scope="module")
def cnn():
  model = registry.create_model("cnn3", num_classes=4)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, C)))
  return lambda v, x: model.apply(v, x), variables


def test_cnn_switch_one_is_batched_backselect(cnn):
  apply, variables = cnn
  x = images(2, seed=6, h=8, w=8)
  exact = sis.batched_backselect(apply, x, params=variables, eval_batch_size=32)
  hybrid = sis.hybrid_backselect(apply, x, params=variables, switch_fraction=1,
                                 remove_per_step=8, eval_batch_size=32)
  for a, b in zip(exact, hybrid):
    np.testing.assert_array_equal(a, b)


def test_patch_features_and_per_image_masked_values(cnn):
  """2×2 patches of an 8×8 image (d = 16); r = 8 after gradient steps of 3, 3 and 2."""
  apply, variables = cnn
  x = images(3, seed=7, h=8, w=8)
  fm = images(3, seed=8, h=8, w=8)  # per-image masked values (e.g. a blurred copy)
  fmap = (np.arange(8)[:, None] // 2) * 4 + np.arange(8)[None, :] // 2
  d, r, k = 16, 8, 3
  hybrid = sis.hybrid_backselect(apply, x, params=variables, feature_map=fmap, fully_masked=fm,
                                 switch_fraction=0.5, remove_per_step=k)
  grad = sis.gradient_backselect(apply, x, params=variables, feature_map=fmap, fully_masked=fm,
                                 remove_per_step=k)
  np.testing.assert_array_equal(hybrid.order[:, :d - r], grad.order[:, :d - r])
  score1 = jax.jit(lambda b, t: sis.log_target_probability(apply(variables, b), t))
  for i in range(3):
    present = np.ones(d, bool)
    present[hybrid.order[i, :d - r]] = False
    target = jnp.asarray([hybrid.target_classes[i]], jnp.int32)
    order, log_scores = reference_backselect(lambda b: score1(jnp.asarray(b), target), x[i],
                                             present, fmap, fm[i])
    np.testing.assert_array_equal(hybrid.order[i, d - r:], order)
    np.testing.assert_allclose(hybrid.values[i, d - r:], np.exp(log_scores), rtol=1e-5)
    want = true_scores(lambda b: apply(variables, b), x[i], hybrid.order[i],
                       hybrid.target_classes[i], step_ends(d, r, k), fmap, fm[i])
    np.testing.assert_allclose(hybrid.values[i, step_ends(d, r, k)], want, rtol=1e-5)


@pytest.mark.parametrize("switch_fraction", [0, -0.5, 1.5, float("nan"), "0.2", None, True])
def test_bad_switch_fraction(switch_fraction):
  with pytest.raises(ValueError, match="switch_fraction"):
    sis.hybrid_backselect(mlp, images(1), params=mlp_params(), switch_fraction=switch_fraction,
                          remove_per_step=2)


@pytest.mark.parametrize("remove_per_step", [0, -1, 2.5, True, D + 1])
def test_bad_remove_per_step(remove_per_step):
  with pytest.raises(ValueError, match="remove_per_step"):
    sis.hybrid_backselect(mlp, images(1), params=mlp_params(), switch_fraction=0.5,
                          remove_per_step=remove_per_step)


def test_config_checks_switch_fraction():
  c = base_config()
  c.backselect.method = "hybrid"
  config_checks.validate_config(c, num_devices=1)
  for bad in (0.0, 1.5):
    c.backselect.switch_fraction = bad
    with pytest.raises(ValueError, match=r"config\.backselect\.switch_fraction"):
      config_checks.validate_config(c, num_devices=1)
  c.backselect.switch_fraction = 0.2
  c.backselect.method = "hybrd"
  with pytest.raises(ValueError, match=r"config\.backselect\.method.*hybrid"):
    config_checks.validate_config(c, num_devices=1)


def test_pipeline_hybrid_records_and_subsets(cnn):
  """``backselect.method = "hybrid"`` through ``run_backselect``, stored as exact records
  (``per_step = 1``), read back unchanged, 5% subsets of ceil(0.05 · 64) = 4 pixels."""
  apply, variables = cnn
  x = images(5, seed=9, h=8, w=8)
  bs = base_config().backselect
  bs.method, bs.remove_per_step, bs.switch_fraction, bs.batch_size = "hybrid", 8, 0.25, 4
  got = backselect_stage.run_backselect(apply, variables, x, bs, seed=3)
  want = sis.hybrid_backselect(apply, x, params=variables, switch_fraction=0.25,
                               remove_per_step=8, seed=3, batch_size=4)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)
  step = backselect_stage.per_step(bs)
  assert step == 1
  shard = record_shards.encode(got.order, got.values, got.target_classes, got.original_scores,
                               [str(i) for i in range(5)], step)
  assert record_shards.shard_check(5, 64, step)(shard) is None
  back = record_shards.decode(shard, step)
  np.testing.assert_array_equal(back["order"], got.order)
  np.testing.assert_array_equal(back["values"], got.values)
  kept = sis.keep_mask(back["order"], 0.05)
  assert kept.sum(axis=1).tolist() == [4] * 5
  np.testing.assert_array_equal(kept, sis.keep_mask(got, 0.05))
  assert backselect_stage.step_words(bs) == ("8 pixels per gradient step, the last 25% of "
                                             "the pixels exactly")


def test_exact_records_above_65536_features():
  """Hybrid (like exact) records keep exact ranks beyond uint16: d = 70,000 round-trips."""
  rng = np.random.default_rng(0)
  d = 70_000
  order = np.stack([rng.permutation(d) for _ in range(2)]).astype(np.int32)
  values = rng.random((2, d)).astype(np.float32)
  shard = record_shards.encode(order, values, np.zeros(2), np.ones(2), ["a", "b"], 1)
  assert shard["rank"].dtype == np.uint32
  assert record_shards.shard_check(2, d, 1)(shard) is None
  back = record_shards.decode(shard, 1)
  np.testing.assert_array_equal(back["order"], order)
  np.testing.assert_allclose(back["values"], values, rtol=1e-3, atol=1e-6)  # float16


@pytest.mark.slow
def test_smoke_pipeline_with_hybrid(tmp_path):
  """The smoke config through ``main`` (train, backselect, subsets) with ``backselect.method =
  "hybrid"``: exact-style records (a rank per pixel, a value per removal) and 5% subsets of
  ceil(0.05 · 256) = 13 pixels."""
  proc = run_main(tmp_path, "--config.backselect.method=hybrid",
                  "--config.backselect.switch_fraction=0.1",
                  "--config.stages=('train','backselect','subsets')")
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["backselect"]["method"] == "hybrid"
  assert "backselect.switch_fraction" in results["backselect"]["config_reads"]
  assert results["subsets"]["pixels_kept"] == 13
  with np.load(tmp_path / "backselect" / "test" / "shard_00000.npz") as shard:
    assert shard["rank"].shape == shard["step_values"].shape == (64, 256)
  masks = np.unpackbits(np.load(tmp_path / "subsets" / "bs_test.npy"), axis=-1)
  assert masks.reshape(64, -1).sum(axis=1).tolist() == [13] * 64
