"""Model calls of exact backselect split into concurrent parts (issue 28, item 3): the
CPU runtime runs a call inside a loop on one thread, parts run side by side. Splitting
must not change a single bit of the orders or values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overinterp_jax import sharding, sis
from overinterp_jax.models import create_model
from overinterp_jax.selection import exact


def test_parts_and_the_batch_sizes_a_program_calls():
  assert exact.parts_of(256, 2) == 2
  assert exact.parts_of(32, 4) == 4
  assert exact.parts_of(24, 4) == 3  # equal parts only
  assert exact.parts_of(12, 4) == 1  # parts of at least MIN_PART inputs
  assert exact.parts_of(256, 1) == 1
  assert exact.score_batch_sizes((256, 128, 64, 32), 2) == (128, 64, 32, 16)
  assert exact.score_batch_sizes((32, 16, 8, 4), 4) == (8, 4)


@pytest.fixture(scope="module")
def cnn():
  model = create_model("cnn3", num_classes=10)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  images = np.asarray(jax.random.normal(jax.random.key(1), (2, 8, 8, 3)), np.float32)
  return (lambda v, x: model.apply(v, x)), variables, images


def test_split_calls_change_no_bit_of_batched_backselect(cnn, monkeypatch):
  predict, variables, images = cnn
  results = []
  for parallel in (1, 4):
    monkeypatch.setattr(sis, "parallel_calls", lambda mesh=None, p=parallel: p)
    results.append(sis.batched_backselect(predict, images, params=variables,
                                          eval_batch_size=32,
                                          mesh=sharding.data_mesh(jax.devices()[:1])))
  for a, b in zip(*results):
    np.testing.assert_array_equal(a, b)


def test_split_calls_change_no_bit_of_reference_backselect(cnn, monkeypatch):
  predict, variables, images = cnn
  f = lambda b: jax.nn.softmax(predict(variables, b))[:, 3]
  results = []
  for parallel in (1, 2):
    monkeypatch.setattr(sis, "parallel_calls", lambda mesh=None, p=parallel: p)
    results.append(sis.backselect(f, images[0], np.ones((8, 8, 1), bool),
                                  np.zeros((8, 8, 3), np.float32), eval_batch_size=32))
  for a, b in zip(*results):
    np.testing.assert_array_equal(a, b)


def test_parallel_calls_share_the_cores_among_the_devices(devices):
  cores = sis.parallel_calls(sharding.data_mesh(devices[:1]))
  assert cores >= 1
  assert sis.parallel_calls(sharding.data_mesh(devices)) == max(1, cores // len(devices))
