"""Precision policy (float32 / bfloat16 compute) and memory-aware batch sizes."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from overinterp_jax import memory, precision, sharding, sis, train
from overinterp_jax.models import create_model

H, W, C, K = 8, 8, 3, 4


def _mlp():
  model = create_model("mlp", num_classes=K, hidden=32)
  variables = model.init(jax.random.key(0), jnp.zeros((1, H, W, C)))
  return (lambda v, x: model.apply(v, x)), variables


def _images(n, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(n, H, W, C)), jnp.float32)


def test_unknown_policy_is_named():
  with pytest.raises(ValueError, match="precision must be one of"):
    precision.compute_dtype("float8")
  predict, variables = _mlp()
  with pytest.raises(ValueError, match="precision must be one of"):
    sis.batched_backselect(predict, _images(1), params=variables, compute_dtype="fp16")


def test_float32_policy_leaves_the_function_unchanged():
  predict, _ = _mlp()
  assert precision.in_compute_dtype(predict, "float32") is predict
  assert precision.in_compute_dtype(predict, None) is predict


def test_bfloat16_backselect_computes_in_bfloat16_and_reports_float32():
  predict, variables = _mlp()
  seen = []

  def spy(v, x):
    seen.append((x.dtype, jax.tree.leaves(v)[0].dtype))
    return predict(v, x)

  mesh = sharding.data_mesh(jax.devices()[:1])
  images = _images(2)
  r16 = sis.batched_backselect(spy, images, params=variables, compute_dtype="bfloat16",
                               eval_batch_size=16, mesh=mesh)
  r32 = sis.batched_backselect(predict, images, params=variables, eval_batch_size=16,
                               mesh=mesh)
  assert (jnp.bfloat16, jnp.bfloat16) in seen
  assert r16.values.dtype == np.float32 and r16.original_scores.dtype == np.float32
  np.testing.assert_array_equal(r16.target_classes, r32.target_classes)
  # Same ranking up to bfloat16 rounding: the removal step of each pixel agrees closely.
  rank16 = np.argsort(r16.order, axis=1)
  rank32 = np.argsort(r32.order, axis=1)
  for a, b in zip(rank16, rank32):
    assert np.corrcoef(a, b)[0, 1] > 0.8
  g = sis.gradient_backselect(predict, images, params=variables, remove_per_step=8,
                              compute_dtype="bfloat16", mesh=mesh)
  assert g.values.dtype == np.float32 and np.isfinite(g.values).all()


def test_bfloat16_train_step_keeps_float32_state():
  model = create_model("resnet20", num_classes=K)
  tx = optax.sgd(0.1)
  state = train.create_train_state(model, tx, (H, W, C), jax.random.key(0))
  images, labels = _images(4), jnp.arange(4) % K
  new16, m16 = train.train_step(state, images, labels, jax.random.key(1),
                                compute_dtype="bfloat16")
  new32, m32 = train.train_step(state, images, labels, jax.random.key(1))
  for tree in (new16.params, new16.batch_stats, new16.opt_state):
    for leaf in jax.tree.leaves(tree):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == jnp.float32
  assert np.isfinite(float(m16["loss"]))
  np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=0.05)


def test_cpu_budget_and_batches_that_fit():
  assert memory.device_budget_bytes() == memory.CPU_BUDGET_BYTES  # the CPU reports no stats
  predict, variables = _mlp()
  images = _images(64)
  small = sis.gradient_batch_size(predict, images, params=variables,
                                  memory_budget_bytes=50_000)
  large = sis.gradient_batch_size(predict, images, params=variables,
                                  memory_budget_bytes=50_000_000)
  assert 1 <= small < large <= 64
  # batch_size=None chooses from the budget and gives the same result as that batch.
  mesh = sharding.data_mesh(jax.devices()[:1])
  auto = sis.gradient_backselect(predict, images[:6], params=variables, remove_per_step=16,
                                 batch_size=None, memory_budget_bytes=50_000, mesh=mesh)
  fixed = sis.gradient_backselect(predict, images[:6], params=variables, remove_per_step=16,
                                  batch_size=6, mesh=mesh)
  np.testing.assert_array_equal(auto.order, fixed.order)


def test_device_budget_reads_memory_stats():
  class FakeDevice:
    platform = "fakegpu"

    def memory_stats(self):
      return {"bytes_limit": 1000, "bytes_in_use": 200}

  # The allocator's limit, not what is free now: the same device, the same batches.
  assert memory.device_budget_bytes(FakeDevice(), fraction=0.5) == 500


def test_training_batch_from_memory():
  from overinterp_jax.config_schema import base_config
  config = base_config()
  config.model.name = "cnn3"
  config.model.num_classes = K
  config.train.update(dict(lr=0.1, schedule="onecycle", num_epochs=1, warmup_fraction=0.2))
  fit = lambda budget: train.memory_fitted_batch_size(
      config, (H, W, C), num_devices=2, num_train=4096, budget_bytes=budget)
  small, large = fit(2_000_000), fit(2_000_000_000)
  assert small < large == 2 * 256  # capped at 256 per device
  per_device = small // 2
  assert small % 2 == 0 and per_device & (per_device - 1) == 0  # a power of two per device
  assert fit(2_000_000_000) <= 4096 and train.memory_fitted_batch_size(
      config, (H, W, C), num_devices=2, num_train=100, budget_bytes=2_000_000_000) <= 100
