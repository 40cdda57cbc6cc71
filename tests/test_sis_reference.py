"""Parity with the reference `sufficient_input_subsets` library's test suite.

Tables from docs/reference_details.md §2. Indices, orderings and masks are
compared exactly; values with a float32 tolerance (the reference computes in
float64 numpy, we in float32 JAX). Our two documented differences (empty SIS
mask all False, starting check on the masked input) have their own tests.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from overinterp_jax import sis
from overinterp_jax.selection import records

T, F = True, False
F_L2 = lambda b: jnp.linalg.norm(b, axis=-1)
F_SUM = lambda b: b.reshape(b.shape[0], -1).sum(-1)
THETA = jnp.array([1.0, 2.0, 0.0, 1.0])
F_LINREGRESS = lambda b: b @ THETA


def result(s, ordering, values, mask):
  return sis.SISResult(np.array(s), np.array(ordering), np.array(values, np.float32),
                       np.array(mask))


def assert_result(actual, expected):
  assert actual is not None
  assert actual.approx_equal(expected, rtol=1e-6, atol=1e-6), (actual, expected)


# T2, T3, T4: the result type -------------------------------------------------

@pytest.mark.parametrize("s,length", [([[0]], 1), ([[0, 1], [1, 2], [2, 3]], 3)])
def test_sisresult_len(s, length):
  r = sis.SISResult(np.array(s), np.array([[0]]), np.array([1.0]), np.array([T]))
  assert len(r) == length


BASE = dict(s=[[1]], ordering=[[0], [1]], values=[10.0, 0.0], mask=[F, T])


def _base(**kw):
  d = {**BASE, **kw}
  return sis.SISResult(np.array(d["s"]), np.array(d["ordering"]),
                       np.array(d["values"], np.float64), np.array(d["mask"]))


@pytest.mark.parametrize("a,b,equal", [
    (_base(), _base(), True),
    (_base(values=[10.0, 0.0]), _base(values=[10.0, 0.000000001]), False),
    (_base(), _base(s=[[2]]), False),
    (_base(), _base(ordering=[[1], [1]]), False),
    (_base(values=[10, 5]), _base(values=[10, 0]), False),
    (_base(values=[10, 5]), _base(values=[10, 10.01]), False),
    (_base(), _base(mask=[F, F]), False),
])
def test_sis_result_equality(a, b, equal):
  assert (a == b) is equal and (b == a) is equal
  assert (a != b) is (not equal)
  assert a != "not a result"


@pytest.mark.parametrize("a,b,equal", [
    (_base(), _base(), True),
    (_base(values=[10.0, 0.0]), _base(values=[10.0, 1e-9]), True),
    (_base(values=[10.0, 0.0]), _base(values=[10.01, 0.0]), False),
    (_base(), _base(mask=[T, T]), False),
])
def test_sis_result_approx_equality(a, b, equal):
  assert a.approx_equal(b) is equal


def test_sis_result_is_unhashable():
  with pytest.raises(TypeError):
    hash(_base())


# T5, T6: masks ----------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 3), (3, 4), (3,), (4, 3, 8)])
def test_make_empty_boolean_mask(shape):
  m = sis.make_empty_boolean_mask(shape)
  assert m.shape == shape and m.dtype == bool and m.all()


@pytest.mark.parametrize("shape,axis,expected", [
    ((2, 3), 0, (1, 3)), ((2, 3), (0,), (1, 3)), ((2, 3), 1, (2, 1)),
    ((2, 3), (0, 1), (1, 1)), ((4, 5, 6), 1, (4, 1, 6)), ((4, 5, 6), (1, 2), (4, 1, 1)),
])
def test_make_empty_boolean_mask_broadcast_over_axis(shape, axis, expected):
  m = sis.make_empty_boolean_mask_broadcast_over_axis(shape, axis)
  assert m.shape == expected and m.all()


# T7, T8: disjointness ----------------------------------------------------------

def _with_sis(s):
  return sis.SISResult(np.array(s), np.array(s), np.zeros(len(s)), np.array([T]))


def test_assert_sis_collection_disjoint():
  sis.reference.assert_sis_collection_disjoint([_with_sis([[0], [1]]), _with_sis([[2], [3]])])


def test_assert_sis_collection_disjoint_raises_error():
  with pytest.raises(AssertionError):
    sis.reference.assert_sis_collection_disjoint([_with_sis([[0], [1]]), _with_sis([[1], [2]])])


# T12, T13: masked inputs --------------------------------------------------------

@pytest.mark.parametrize("x,fm,masks,expected", [
    ([1, 2, 3, 4, 5], [0] * 5, [[F, T, F, T, T]], [[0, 2, 0, 4, 5]]),
    ([1, 2, 3], [0] * 3, [[T, T, F], [T, T, T], [F, F, F], [F, T, F]],
     [[1, 2, 0], [1, 2, 3], [0, 0, 0], [0, 2, 0]]),
    ([[1, 2, 3], [4, 5, 6]], np.zeros((2, 3)), [[[T, F, F], [F, T, T]]],
     [[[1, 0, 0], [0, 5, 6]]]),
    ([[1, 2, 3], [4, 5, 6]], np.zeros((2, 3)),
     [np.ones((2, 3), bool), np.zeros((2, 3), bool), [[T, F, T], [F, T, F]]],
     [[[1, 2, 3], [4, 5, 6]], np.zeros((2, 3)), [[1, 0, 3], [0, 5, 0]]]),
    (["A", "B", "C", "D"], ["-"] * 4, [[F, T, F, T]], [["-", "B", "-", "D"]]),
])
def test_produce_masked_inputs(x, fm, masks, expected):
  out = sis.produce_masked_inputs(np.array(x), np.array(fm), np.array(masks))
  np.testing.assert_array_equal(out, np.array(expected))


def test_produce_masked_inputs_raises_error():
  with pytest.raises(TypeError, match="one more dimension"):
    sis.produce_masked_inputs(np.array([1, 2, 3]), np.zeros(3), np.array([T, F, T]))


# T14: backward selection --------------------------------------------------------

@pytest.mark.parametrize("f,x,mask,expected", [
    (F_L2, [1, 10], [T, T], [([0], 10), ([1], 0)]),
    (F_L2, [1, 10], [F, F], []),
    (F_L2, [10, 1], [T, T], [([1], 10), ([0], 0)]),
    (F_L2, [10, 1], [F, T], [([1], 0)]),
    (F_L2, [10, 1], [T, F], [([0], 0)]),
    (F_L2, [10, 10, 10], [T, T, T], [([0], math.sqrt(200)), ([1], 10), ([2], 0)]),
    (F_L2, [0.1, 10, 5, 1], [T, T, T, T],
     [([0], math.sqrt(126)), ([3], math.sqrt(125)), ([2], 10), ([1], 0)]),
    (F_SUM, [[10, 5], [2, 3]], np.ones((2, 2), bool),
     [([1, 0], 18), ([1, 1], 15), ([0, 1], 10), ([0, 0], 0)]),
    (F_SUM, [[10, 5], [2, 3]], [[T, T]], [([0, 1], 12), ([0, 0], 0)]),
    (F_SUM, [[10, 5], [2, 3]], [[T], [T]], [([1, 0], 15), ([0, 0], 0)]),
])
def test_backselect(f, x, mask, expected):
  x = jnp.array(x, jnp.float32)
  ordering, values = sis.backselect(f, x, np.array(mask), jnp.zeros_like(x))
  assert ordering.shape == (len(expected), np.ndim(mask))
  np.testing.assert_array_equal(ordering, np.array([i for i, _ in expected]).reshape(ordering.shape))
  np.testing.assert_allclose(values, [v for _, v in expected], rtol=1e-6)


# T15, T16: FindSIS on a record ----------------------------------------------------

@pytest.mark.parametrize("tau,expected", [
    (0.6, []), (0.5, []), (0.65, [3]), (0.7, [3]), (0.8, [3, 1]), (0.99, [3, 1, 2]),
    (2.0, [3, 1, 2, 0]),
])
def test_find_sis_from_backselect(tau, expected):
  order = np.array([0, 2, 1, 3])
  values = np.array([1.0, 0.9, 0.7, 0.6])
  k = int(records.sis_length(values, tau))
  np.testing.assert_array_equal(order[len(order) - k:][::-1], expected)


# T17: find_sis ---------------------------------------------------------------------

R125 = math.sqrt(125)


@pytest.mark.parametrize("f,tau,x,mask,expected", [
    (F_L2, 1, [.1, 10], [T, T], result([[1]], [[0], [1]], [10, 0], [F, T])),
    (F_L2, 1, [10, .1], [T, T], result([[0]], [[1], [0]], [10, 0], [T, F])),
    (F_L2, 1, [.1, 10, 5], [T, T, T],
     result([[1]], [[0], [2], [1]], [R125, 10, 0], [F, T, F])),
    (F_L2, 10.5, [.1, 10, 5], [T, T, T],
     result([[1], [2]], [[0], [2], [1]], [R125, 10, 0], [F, T, T])),
    (F_L2, 5, [3, 4], [T, T], result([[1], [0]], [[0], [1]], [4, 0], [T, T])),
    (F_L2, 5.1, [3, 4], [T, T], None),
    (F_L2, 1000, [.1, 10, 5], [T, T, T], None),
    (F_L2, 1, [.1, 10, 5], [T, F, T], result([[2]], [[0], [2]], [5, 0], [F, F, T])),
    (F_L2, 1, [10, .1], [F, F], None),
    (F_SUM, 4, [[10, 5], [2, 3]], np.ones((2, 2), bool),
     result([[0, 0]], [[1, 0], [1, 1], [0, 1], [0, 0]], [18, 15, 10, 0], [[T, F], [F, F]])),
    (F_SUM, 4, [[10, 5], [2, 13]], [[T, T]],
     result([[0, 1]], [[0, 0], [0, 1]], [18, 0], [[F, T]])),
    (F_SUM, 4, [[10, 5], [2, 13]], [[T], [T]],
     result([[1, 0]], [[0, 0], [1, 0]], [15, 0], [[F], [T]])),
])
def test_find_sis(f, tau, x, mask, expected):
  x = jnp.array(x, jnp.float32)
  out = sis.find_sis(f, tau, x, np.array(mask), jnp.zeros_like(x))
  if expected is None:
    assert out is None
  else:
    assert_result(out, expected)


# T18: sis_collection -----------------------------------------------------------------

R_L2_1 = result([[1]], [[0], [1]], [10, 0], [F, T])
SUM_A = [result([[0, 0]], [[1, 0], [1, 1], [0, 1], [0, 0]], [18, 15, 10, 0], [[T, F], [F, F]]),
         result([[0, 1]], [[1, 0], [1, 1], [0, 1]], [8, 5, 0], [[F, T], [F, F]]),
         result([[1, 1], [1, 0]], [[1, 0], [1, 1]], [3, 0], [[F, F], [T, T]])]


@pytest.mark.parametrize("f,tau,x,initial_mask,expected", [
    (F_L2, 1000, [.1, 10], None, []),
    (F_L2, 1, [.1, 10], None, [R_L2_1]),
    (F_L2, 0.1, [.1, 10], None, [R_L2_1, result([[0]], [[0]], [0.0], [T, F])]),
    (F_L2, 0.1, [10, .1], None, [result([[0]], [[1], [0]], [10, 0], [T, F]),
                                 result([[1]], [[1]], [0], [F, T])]),
    (F_L2, 4.5, [3, 4], None, [result([[1], [0]], [[0], [1]], [4, 0], [T, T])]),
    (F_L2, 1, [.1, 10, 5], None,
     [result([[1]], [[0], [2], [1]], [R125, 10, 0], [F, T, F]),
      result([[2]], [[0], [2]], [5, 0], [F, F, T])]),
    (F_L2, 1, [.9, .9, 10, 5], None,
     [result([[2]], [[0], [1], [3], [2]], [math.sqrt(125.81), R125, 10, 0], [F, F, T, F]),
      result([[3]], [[0], [1], [3]], [math.sqrt(25.81), 5, 0], [F, F, F, T]),
      result([[1], [0]], [[0], [1]], [0.9, 0], [T, T, F, F])]),
    (F_SUM, 4, [[10, 5], [2, 3]], None, SUM_A),
    (F_SUM, 4, [[10, 5], [2, 3]], np.ones((2, 2), bool), SUM_A),
    (F_SUM, 10, [[10, 5], [2, 3]], [[T, T]], [result([[0, 0]], [[0, 1], [0, 0]], [12, 0], [[T, F]])]),
    (F_SUM, 10, [[10, 5, 9], [2, 3, 1]], [[T, T, T]],
     [result([[0, 0]], [[0, 1], [0, 2], [0, 0]], [22, 12, 0], [[T, F, F]]),
      result([[0, 2]], [[0, 1], [0, 2]], [10, 0], [[F, F, T]])]),
    (F_SUM, 5, [[10, 5, 9], [2, 3, 1]], [[T], [T]],
     [result([[0, 0]], [[1, 0], [0, 0]], [24, 0], [[T], [F]]),
      result([[1, 0]], [[1, 0]], [0], [[F], [T]])]),
    (F_LINREGRESS, 5, [5, 1, 6, 3], None,
     [result([[0]], [[2], [1], [3], [0]], [10, 8, 5, 0], [T, F, F, F]),
      result([[3], [1]], [[2], [1], [3]], [5, 3, 0], [F, T, F, T])]),
])
def test_sis_collection(f, tau, x, initial_mask, expected):
  x = jnp.array(x, jnp.float32)
  mask = None if initial_mask is None else np.array(initial_mask)
  out = sis.sis_collection(f, tau, x, jnp.zeros_like(x), initial_mask=mask)
  assert len(out) == len(expected)
  for a, e in zip(out, expected):
    assert_result(a, e)


def test_readme_vectors():
  # The two 0.1 entries tie only up to rounding: in float32, 0.5+0.8+0.1 and
  # 0.1+0.5+0.8 differ by one ulp. The reference computes in float64; so do we here.
  with jax.enable_x64(True):
    x = jnp.array([0.1, 0.5, 0.8, 0.1], jnp.float64)
    (r,) = sis.sis_collection(F_SUM, 1, x, jnp.zeros(4, jnp.float64))
  assert_result(r, result([[2], [1]], [[0], [3], [1], [2]], [1.4, 1.3, 0.8, 0.0], [F, T, T, F]))
  x = jnp.array([[0.1, 0.5, 0.4], [0.2, 0.6, 0.3]])
  first, second = sis.sis_collection(F_SUM, 1, x, jnp.zeros_like(x),
                                     initial_mask=np.ones((1, 3), bool))
  np.testing.assert_array_equal(first.sis, [[0, 1]])
  np.testing.assert_array_equal(first.ordering_over_entire_backselect, [[0, 0], [0, 2], [0, 1]])
  np.testing.assert_allclose(first.values_over_entire_backselect, [1.8, 1.1, 0.0], rtol=1e-6)
  np.testing.assert_array_equal(second.sis, [[0, 2], [0, 0]])
  np.testing.assert_allclose(second.values_over_entire_backselect, [0.7, 0.0], rtol=1e-6)


# Our documented decisions (docs/method.md §6) -------------------------------------------

def test_empty_sis_has_all_false_mask_and_ends_collection():
  # The fully masked input [1, 1] already scores 2 >= 0.5: the SIS is empty.
  x = jnp.array([1.0, 2.0])
  r = sis.find_sis(F_SUM, 0.5, x, np.array([T, T]), jnp.ones(2))
  assert len(r) == 0 and r.sis.shape == (0,)  # the reference's shape
  np.testing.assert_array_equal(r.mask, [F, F])
  np.testing.assert_allclose(r.values_over_entire_backselect, [3, 2])
  assert len(sis.sis_collection(F_SUM, 0.5, x, jnp.ones(2))) == 1


def test_starting_check_uses_the_masked_input():
  # Unmasked, L2([3, 4]) = 5 >= 4.5; with feature 1 masked, L2([3, 0]) = 3 < 4.5.
  x = jnp.array([3.0, 4.0])
  assert sis.find_sis(F_L2, 4.5, x, np.array([T, F]), jnp.zeros(2)) is None
  assert sis.find_sis(F_L2, 2.5, x, np.array([T, F]), jnp.zeros(2)) is not None


def test_sis_alone_reaches_threshold_and_is_minimal_suffix():
  rng = np.random.default_rng(0)
  x = jnp.array(rng.normal(size=12), jnp.float32)
  for tau in [0.5, 1.0, 2.0]:
    r = sis.find_sis(F_L2, tau, x, np.ones(12, bool), jnp.zeros(12))
    kept = jnp.where(jnp.asarray(r.mask), x, 0)
    assert float(F_L2(kept[None])[0]) >= tau
    # Dropping the first SIS element (the last one added) falls below tau.
    smaller = r.mask.copy()
    smaller[tuple(r.sis[-1])] = False
    assert float(F_L2(jnp.where(jnp.asarray(smaller), x, 0)[None])[0]) < tau
