"""Precision policy: the dtype models compute in, with float32 parameters and results.

``"float32"`` (the default, what the tests and every comparison with the
reference library use) computes everything in float32. ``"bfloat16"`` casts
the parameters and the inputs to bfloat16 for the model's evaluation only:
parameters, optimiser state and batch-norm statistics stay float32, logits
come back as float32, and backward selection ranks candidates by the
float32 log-probability computed from them. docs/benchmarks.md says what
bfloat16 does to exact backselect orders and SIS sizes.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

POLICIES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(policy: str | None):
  """The dtype of ``policy`` (None = float32).

  Raises:
    ValueError: an unknown policy (the message lists the known ones).
  """
  if policy is None:
    return jnp.dtype(jnp.float32)
  if policy not in POLICIES:
    raise ValueError(f"precision must be one of {sorted(POLICIES)}, got {policy!r}.")
  return jnp.dtype(POLICIES[policy])


def cast_floats(tree, dtype):
  """Every floating-point leaf of ``tree`` cast to ``dtype``; other leaves unchanged."""
  return jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a,
      tree)


def in_compute_dtype(apply: Callable, policy: str | None, takes_params: bool = True) -> Callable:
  """``apply(params, x)`` (or ``apply(x)``) evaluated in ``policy``'s dtype, float32 out.

  Returns ``apply`` itself for float32, so the default path is unchanged bit for bit.
  """
  dtype = compute_dtype(policy)
  if dtype == jnp.float32:
    return apply
  if takes_params:
    return lambda params, x: apply(cast_floats(params, dtype), x.astype(dtype)).astype(
        jnp.float32)
  return lambda x: apply(x.astype(dtype)).astype(jnp.float32)
