"""Exact backselect with its loop over steps on the host (issue 28, item 3): inside a
compiled loop XLA's CPU runtime runs a model call on one thread, at top level on all
cores. The host-driven steps must give the compiled loop's orders and values bit for bit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overinterp_jax import sis
from overinterp_jax.models import create_model
from overinterp_jax.selection import exact


def test_call_schedule():
  sizes = exact.chunk_sizes(256)
  assert exact.call_schedule(256, sizes) == [256]
  assert exact.call_schedule(255, sizes) == [128, 64, 32, 32]
  assert exact.call_schedule(600, sizes) == [256, 256, 64, 32]
  assert exact.call_schedule(24, (100, 50, 25, 12)) == [12, 12]
  for total in range(1, 700):
    calls = exact.call_schedule(total, sizes)
    assert total <= sum(calls) < total + sizes[-1]


@pytest.fixture(scope="module")
def cnn():
  model = create_model("cnn3", num_classes=10)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  images = np.asarray(jax.random.normal(jax.random.key(1), (2, 8, 8, 3)), np.float32)
  score = lambda params, x, rows, targets: jax.nn.log_softmax(model.apply(params, x))[
      jnp.arange(x.shape[0]), targets[rows]]
  return score, variables, images


def test_host_steps_give_the_compiled_loop_bit_for_bit(cnn):
  score, variables, images = cnn
  present0 = np.ones((2, 64), bool)
  present0[1, ::3] = False  # the second image starts with 42 features
  args = (variables, jnp.asarray(images), jnp.zeros_like(images), jnp.asarray(present0),
          jnp.array([3, 7], jnp.int32), None)
  # eval_batch 16 < 2 * 64 candidates: steps with full calls of 16, then the remainder
  shape = dict(eval_batch=16, mask_shape=(8, 8, 1), use_feature_map=False,
               shared_fully_masked=True)
  loop = jax.jit(exact.exact_backselect_program(score, num_steps=64, **shape))(*args)
  host = exact.stepped_backselect(score, **shape)(*args)
  order, values, nonfinite = map(np.asarray, host)
  assert order.shape == (2, 64)
  np.testing.assert_array_equal(order, np.asarray(loop[0]))
  np.testing.assert_array_equal(values, np.asarray(loop[1]))
  np.testing.assert_array_equal(nonfinite, np.asarray(loop[2]))
  assert (order[1, 42:] == -1).all() and np.isnan(values[1, 42:]).all()


def test_backselect_on_the_host_path_and_in_one_program_agree(cnn, monkeypatch):
  score, variables, images = cnn
  f = lambda b: score(variables, b, jnp.zeros(b.shape[0], jnp.int32), jnp.array([3]))
  mask = np.ones((8, 8, 1), bool)
  mask[:2] = False
  results = []
  for on_host in (False, True):
    monkeypatch.setattr(sis.engines, "steps_on_host", lambda on_host=on_host: on_host)
    results.append((sis.backselect(f, images[0], mask, np.zeros((8, 8, 3), np.float32),
                                   eval_batch_size=32),
                    sis.find_sis(f, 0.0, images[0], mask, np.zeros((8, 8, 3), np.float32),
                                 eval_batch_size=32)))
  (loop, below_loop), (host, below_host) = results
  for a, b in zip(loop, host):
    np.testing.assert_array_equal(a, b)
  assert below_loop is None and below_host is None  # log-probabilities never reach 0


def test_steps_on_host_only_when_asked_on_a_cpu_with_several_cores(monkeypatch):
  monkeypatch.delenv(sis.STEPS_ON_HOST_ENV, raising=False)
  monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1}, raising=False)
  monkeypatch.setattr("os.cpu_count", lambda: 2)
  assert not sis.steps_on_host()  # the compiled loop by default
  monkeypatch.setenv(sis.STEPS_ON_HOST_ENV, "1")
  assert sis.steps_on_host() == (jax.local_devices()[0].platform == "cpu")
  monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0}, raising=False)
  monkeypatch.setattr("os.cpu_count", lambda: 1)
  assert not sis.steps_on_host()
  monkeypatch.setenv(sis.STEPS_ON_HOST_ENV, "0")
  assert not sis.steps_on_host()
