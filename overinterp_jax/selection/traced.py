"""A function as data: what it computes (a cache key) and the arrays it closes over.

Compiled selection programs are cached, since compiling costs far more than
a small problem's whole backward selection. The cache must never change a
result, so it cannot be keyed on the Python function object: JAX bakes the
arrays a function closes over into the compiled program as constants, and a
function whose array was changed in place, or whose global was rebound, would
get the old program and the old answer.

Instead a function is traced to a jaxpr at every batch size a program calls it
with (milliseconds for a small model, next to seconds of compiling), and
  * the arrays it closes over become program *arguments* (``Traced.consts``),
    read afresh at every call, never baked in;
  * the cache key is a digest of the jaxprs' text (primitives, shapes, literal
    scalars such as a rebound Python float) and of the bytes of constants that
    sit inside nested closed jaxprs (e.g. of a ``jax.jit``-wrapped function),
    which the program does bake in.
The same computation gives the same key, whatever the function object, so a
repeat call reuses its program; any change in what is computed changes the key.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
from jax.extend import core as jex_core


class Traced(NamedTuple):
  """``fn(params, x)`` traced at ``batch_sizes``.

  Fields:
    key: hex digest naming what ``fn`` computes at these sizes.
    batch_sizes: the leading sizes of ``x`` it was traced at.
    jaxprs: one open jaxpr per batch size; inputs ``(*consts, *params leaves, x)``.
    consts: one tuple of closed-over arrays per batch size.
    out_tree: the output's pytree structure.
  """
  key: str
  batch_sizes: tuple[int, ...]
  jaxprs: tuple
  consts: tuple
  out_tree: Any


def abstract(tree):
  """``ShapeDtypeStruct`` of every leaf (Python scalars and numpy arrays too)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jax.numpy.result_type(a)),
                      tree)


def trace(fn: Callable, params: Any, example: jax.ShapeDtypeStruct,
          batch_sizes: Sequence[int]) -> Traced:
  """Traces ``fn(params, x)`` with ``x: [b, *example.shape[1:]]`` for each ``b``.

  Raises whatever tracing raises (e.g. ``TracerArrayConversionError`` for a
  function that calls numpy on its input).
  """
  sizes = tuple(sorted(set(int(b) for b in batch_sizes)))
  params_struct = abstract(params)
  digest = hashlib.sha256()
  digest.update(repr(jax.tree.structure(params)).encode())
  jaxprs, consts, out_tree = [], [], None
  for b in sizes:
    x = jax.ShapeDtypeStruct((b,) + tuple(example.shape[1:]), example.dtype)
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(params_struct, x)
    out_tree = jax.tree.structure(out_shape)
    digest.update(f"{b}|{closed.jaxpr}|{out_tree}|".encode())
    for c in closed.consts:
      digest.update(f"{np.shape(c)}{jax.numpy.result_type(c)}".encode())
    _digest_nested_consts(closed.jaxpr, digest)
    jaxprs.append(closed.jaxpr)
    consts.append(tuple(closed.consts))
  return Traced(digest.hexdigest(), sizes, tuple(jaxprs), tuple(consts), out_tree)


def _digest_nested_consts(jaxpr, digest) -> None:
  """Adds the bytes of every constant baked into a nested closed jaxpr."""
  for eqn in jaxpr.eqns:
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jex_core.ClosedJaxpr):
          for c in sub.consts:
            a = np.asarray(c)
            digest.update(f"{a.shape}{a.dtype}".encode())
            digest.update(np.ascontiguousarray(a).tobytes())
          _digest_nested_consts(sub.jaxpr, digest)
        elif isinstance(sub, jex_core.Jaxpr):
          _digest_nested_consts(sub, digest)


def applier(traced: Traced) -> Callable:
  """``apply(params, consts, x)``: ``fn(params, x)`` from the jaxpr of ``x``'s batch size.

  ``consts`` is ``traced.consts`` (or arrays of the same shapes), passed at
  call time so nothing the function closes over is compiled in.
  """
  by_size = {b: i for i, b in enumerate(traced.batch_sizes)}
  jaxprs, out_tree = traced.jaxprs, traced.out_tree

  def apply(params, consts, x):
    b = x.shape[0]
    if b not in by_size:
      raise ValueError(f"Internal error: the score function was traced at batch sizes "
                       f"{sorted(by_size)}, called at {b}.")
    i = by_size[b]
    out = jax.core.eval_jaxpr(jaxprs[i], consts[i], *jax.tree.leaves(params), x)
    return jax.tree.unflatten(out_tree, out)

  return apply
