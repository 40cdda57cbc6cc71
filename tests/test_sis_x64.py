"""The threshold is compared in one dtype, the scores', in both of JAX's precision modes.

With ``jax_enable_x64`` a compiled score is float64; a threshold that float32 rounds
upward (0.1, 0.2, 0.3, 0.6) must still be met by a score equal to it, by the start
check, by FindSIS and on the host path alike (issue 28, item 2).
"""
import contextlib
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overinterp_jax import sis

F_SUM = lambda b: jnp.sum(b, -1)
F_L2 = lambda b: jnp.linalg.norm(b, 2, -1)
ROUNDED_UP = (0.1, 0.2, 0.3, 0.6)  # float32(tau) > tau


@contextlib.contextmanager
def deadline(seconds: float):
  """Raises TimeoutError in the test if the block runs longer than ``seconds``."""
  def expire(signum, frame):
    raise TimeoutError(f"did not return within {seconds} s")
  previous = signal.signal(signal.SIGALRM, expire)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("tau", ROUNDED_UP)
def test_find_sis_score_equal_to_a_threshold_float32_rounds_up(x64, tau):
  assert float(np.float32(tau)) > tau
  with jax.enable_x64(x64):
    results = [sis.find_sis(F_SUM, tau, np.array([0., tau]), np.array([True, True]),
                            np.zeros(2), engine=engine) for engine in ("compiled", "host")]
  for r in results:  # the reference's result
    np.testing.assert_array_equal(r.sis, [[1]])
    np.testing.assert_array_equal(r.ordering_over_entire_backselect, [[0], [1]])
    np.testing.assert_allclose(r.values_over_entire_backselect, [tau, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(r.mask, [False, True])
  assert results[0] == results[1]


@pytest.mark.parametrize("x64", [False, True])
def test_threshold_equal_to_the_score_of_the_input(x64):
  # tau = f(x) exactly, in the mode's own precision (0.2236068 in float32).
  with jax.enable_x64(x64):
    x = np.array([0.1, 0.2])
    tau = float(F_L2(jnp.asarray(x)[None])[0])
    results = [sis.find_sis(F_L2, tau, x, np.array([True, True]), np.zeros(2), engine=engine)
               for engine in ("compiled", "host")]
  for r in results:
    assert r is not None
    np.testing.assert_array_equal(r.sis, [[1], [0]])
    np.testing.assert_array_equal(r.ordering_over_entire_backselect, [[0], [1]])
  assert results[0] == results[1]


@pytest.mark.parametrize("x64", [False, True])
def test_sis_collection_ends_when_the_second_score_equals_the_threshold(x64):
  # Used to repeat the SIS [[0]] forever under x64 (the start check at float32).
  with jax.enable_x64(x64), deadline(60):
    collection = sis.sis_collection(F_L2, 0.1, np.array([10., .1]), np.zeros(2))
  assert [r.sis.tolist() for r in collection] == [[[0]], [[1]]]
  np.testing.assert_allclose(collection[1].values_over_entire_backselect, [0.0], atol=1e-12)
