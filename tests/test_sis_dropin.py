"""The SIS library as a drop-in for the reference: never stale, any Python score, reference inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overinterp_jax import sharding, sis

X3 = np.array([5.0, 1.0, 3.0])
FM3 = np.zeros(3)


def sis_lists(collection):
  return [r.sis.tolist() for r in collection]


# Stale results: a cache must never change a result -------------------------------------

def test_sis_collection_sees_in_place_mutation():
  theta = np.array([1.0, 1.0, 1.0])
  f = lambda b: b @ theta
  assert sis_lists(sis.sis_collection(f, 4.0, X3, FM3)) == [[[0]], [[2], [1]]]
  theta[:] = [0.0, 0.0, 10.0]
  (only,) = sis.sis_collection(f, 4.0, X3, FM3)
  assert only.sis.tolist() == [[2]]
  np.testing.assert_allclose(only.values_over_entire_backselect, [30, 30, 0])
  # A new lambda over the mutated array, too.
  assert sis_lists(sis.sis_collection(lambda b: b @ theta, 4.0, X3, FM3)) == [[[2]]]


THETA_GLOBAL = np.array([1.0, 1.0, 1.0])


def f_global(b):
  return b @ THETA_GLOBAL


def test_sis_collection_sees_rebound_global():
  global THETA_GLOBAL
  THETA_GLOBAL = np.array([1.0, 1.0, 1.0])
  assert sis_lists(sis.sis_collection(f_global, 4.0, X3, FM3)) == [[[0]], [[2], [1]]]
  THETA_GLOBAL = np.array([0.0, 0.0, 10.0])
  assert sis_lists(sis.sis_collection(f_global, 4.0, X3, FM3)) == [[[2]]]
  THETA_GLOBAL = np.array([1.0, 1.0, 1.0])


SCALE = 1.0


def test_find_sis_and_backselect_see_rebound_python_scalar():
  global SCALE
  f = lambda b: b.sum(-1) * SCALE
  SCALE = 1.0
  first = sis.find_sis(f, 4.0, X3, np.ones(3, bool), FM3)
  order1, values1 = sis.backselect(f, X3, np.ones(3, bool), FM3)
  SCALE = -1.0
  assert sis.find_sis(f, 4.0, X3, np.ones(3, bool), FM3) is None  # f(x) = -9 < 4
  order2, values2 = sis.backselect(f, X3, np.ones(3, bool), FM3)
  SCALE = 1.0
  assert first.sis.tolist() == [[0]]
  np.testing.assert_array_equal(order1.ravel(), [1, 2, 0])  # removes the smallest first
  np.testing.assert_array_equal(order2.ravel(), [0, 2, 1])  # removes the largest first
  np.testing.assert_allclose(values1, [8, 5, 0])
  np.testing.assert_allclose(values2, [-4, -1, 0])


def test_backselect_sees_in_place_mutation_without_recompiling():
  theta = np.array([1.0, 2.0, 3.0])
  f = lambda b: b @ theta
  x, mask = np.ones(3), np.ones(3, bool)
  np.testing.assert_array_equal(sis.backselect(f, x, mask, FM3)[0].ravel(), [0, 1, 2])
  misses = sis.programs.PROGRAMS.misses
  theta[:] = [3.0, 2.0, 1.0]
  np.testing.assert_array_equal(sis.backselect(f, x, mask, FM3)[0].ravel(), [2, 1, 0])
  # The array is a program argument: same computation, same program.
  assert sis.programs.PROGRAMS.misses == misses


def test_jit_wrapped_score_with_nested_constant_is_not_stale():
  # The constant sits inside the jitted function's own jaxpr and is compiled
  # into our program; both functions print the same jaxpr, so the cache key
  # must cover the constant's bytes.
  ones, tens = np.array([1.0, 1.0, 1.0]), np.array([0.0, 0.0, 10.0])
  first = sis.sis_collection(jax.jit(lambda b: b @ ones), 4.0, X3, FM3)
  second = sis.sis_collection(jax.jit(lambda b: b @ tens), 4.0, X3, FM3)
  assert sis_lists(first) == [[[0]], [[2], [1]]] and sis_lists(second) == [[[2]]]


H, W, C, K = 4, 4, 3, 5


def _images(n, seed=0):
  return np.random.default_rng(seed).normal(size=(n, H, W, C)).astype(np.float32)


@pytest.mark.parametrize("method", ["exact", "gradient"])
def test_batched_backselect_sees_mutation_and_rebinding(method):
  rng = np.random.default_rng(1)
  weights = rng.normal(size=(H * W * C, K)).astype(np.float32)
  predict = lambda x: x.reshape(x.shape[0], -1) @ weights
  mesh = sharding.data_mesh(jax.devices()[:1])
  run = {"exact": lambda p: sis.batched_backselect(p, _images(2), eval_batch_size=8, mesh=mesh),
         "gradient": lambda p: sis.gradient_backselect(p, _images(2), remove_per_step=4,
                                                       mesh=mesh)}[method]
  before = run(predict)
  weights[:] = rng.normal(size=weights.shape)
  after = run(predict)
  fresh = np.array(weights)  # a new array object: the uncached answer
  expected = run(lambda x: x.reshape(x.shape[0], -1) @ fresh)
  np.testing.assert_array_equal(after.order, expected.order)
  np.testing.assert_array_equal(after.target_classes, expected.target_classes)
  assert not np.array_equal(before.order, after.order)


# Score functions JAX cannot trace: the host path ------------------------------------------

def test_numpy_score_runs_on_host_with_same_results_and_ties():
  rng = np.random.default_rng(3)
  w = rng.normal(size=12)
  f_jax = lambda b: jnp.exp(b.reshape(b.shape[0], -1) @ w / 4)
  f_np = lambda b: np.exp(np.asarray(b).reshape(b.shape[0], -1) @ w / 4)  # np.exp: untraceable
  x = rng.normal(size=(3, 4)).astype(np.float32)
  fm = np.zeros((3, 4), np.float32)
  assert sis.score_engine(f_np, x) == "host" and sis.score_engine(f_jax, x) == "compiled"
  host = sis.sis_collection(f_np, 1.2, x, fm)
  compiled = sis.sis_collection(f_jax, 1.2, x, fm)
  assert len(host) == len(compiled) >= 1
  for a, b in zip(host, compiled):
    assert a.approx_equal(b, rtol=1e-5, atol=1e-6)
  # Exact ties: a constant score removes features in row-major order on both paths.
  const_np = lambda b: np.ones(len(b))
  order, values = sis.backselect(const_np, x, np.ones((3, 4), bool), fm)
  np.testing.assert_array_equal(order, np.argwhere(np.ones((3, 4))))
  order_c, _ = sis.backselect(lambda b: jnp.ones(len(b)), x, np.ones((3, 4), bool), fm)
  np.testing.assert_array_equal(order, order_c)


def test_untraceable_python_score_uses_host_and_matches_brute_force():
  calls = []

  def f(batch):  # Python control flow on values: not traceable on purpose.
    calls.append(len(batch))
    return np.array([float(sum(v for v in row if v > 0)) for row in np.asarray(batch)])

  x = np.array([2.0, -1.0, 3.0, 0.5])
  with pytest.raises(Exception):
    sis.find_sis(f, 1.0, x, np.ones(4, bool), np.zeros(4), engine="compiled")
  r = sis.find_sis(f, 2.5, x, np.ones(4, bool), np.zeros(4), eval_batch_size=2)
  assert r.sis.tolist() == [[2]]  # 3 alone reaches 2.5
  np.testing.assert_array_equal(r.ordering_over_entire_backselect.ravel(), [1, 3, 0, 2])
  assert max(calls) <= 2  # chunked like the compiled path


def test_host_path_handles_string_tokens():
  tokens = np.array(["the", "movie", "was", "great"])
  fm = np.full(4, "<pad>")
  f = lambda b: np.array([float("great" in row) + 0.1 * float("movie" in row)
                          for row in np.asarray(b).tolist()])
  (r,) = sis.sis_collection(f, 1.0, tokens, fm)
  assert r.sis.tolist() == [[3]]
  assert sis.score_engine(f, tokens) == "host"
  with pytest.raises(ValueError, match="numeric"):
    sis.find_sis(f, 1.0, tokens, np.ones(4, bool), fm, engine="compiled")


def test_host_path_names_bad_scores():
  x = np.ones(3)
  with pytest.raises(ValueError, match="NaN or infinite"):
    sis.find_sis(lambda b: np.full(len(b), np.nan), 0.5, x, np.ones(3, bool), FM3,
                 engine="host")
  with pytest.raises(ValueError, match=r"to \[B\] scores"):
    sis.find_sis(lambda b: np.ones((len(b), 2)), 0.5, x, np.ones(3, bool), FM3, engine="host")
  with pytest.raises(ValueError, match="engine must be one of"):
    sis.find_sis(lambda b: b.sum(-1), 0.5, x, np.ones(3, bool), FM3, engine="gpu")


# Inputs the reference accepts ----------------------------------------------------------

@pytest.mark.parametrize("engine", ["compiled", "host"])
def test_reference_inputs_are_accepted(engine):
  f = lambda b: b.sum(-1)
  x = np.array([5.0, 1.0, 3.0])
  expected = sis.find_sis(f, 4.0, x, np.ones(3, bool), FM3, engine=engine)
  # Integer 0/1 mask, a scalar fully_masked_input, [B, 1] scores.
  got = sis.find_sis(lambda b: f(b)[:, None], 4.0, x, np.ones(3, np.int64), 0.0, engine=engine)
  assert got.approx_equal(expected)
  with pytest.raises(ValueError, match="integer 0/1"):
    sis.find_sis(f, 4.0, x, np.array([0, 1, 2]), FM3, engine=engine)
  # An empty SIS has the reference's shape (0,).
  empty = sis.find_sis(f, -1.0, x, np.ones(3, bool), FM3, engine=engine)
  assert empty.sis.shape == (0,) and not empty.mask.any()
