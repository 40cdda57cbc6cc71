"""Exact backward selection on the host, for score functions JAX cannot trace.

The same algorithm as ``exact.py`` (every present feature's removal is scored,
the highest score wins, ties go to the lowest flat index), run as a numpy loop
that calls ``f`` on numpy batches of at most ``eval_batch`` masked inputs. It
serves any Python score function (numpy, PyTorch, scikit-learn) and inputs of
any dtype, strings and tokens included: masked entries take the value of
``fully_masked`` wherever the mask says absent.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def scores_of(f: Callable, batch: np.ndarray) -> np.ndarray:
  """``f(batch)`` as a ``[B]`` float array; ``[B, 1]`` outputs are accepted.

  Raises:
    ValueError: another shape, or NaN/infinite scores.
  """
  b = batch.shape[0]
  out = np.asarray(f(batch))
  if out.shape == (b, 1):
    out = out[:, 0]
  if out.shape != (b,):
    raise ValueError(f"f must map [B, *D] to [B] scores; for B={b} it returned shape "
                     f"{out.shape}.")
  if not np.issubdtype(out.dtype, np.number) or np.issubdtype(out.dtype, np.complexfloating):
    raise ValueError(f"f must return real scores, got dtype {out.dtype}.")
  if not np.all(np.isfinite(out)):
    raise ValueError("f returned NaN or infinite scores; SIS needs finite scores.")
  return out


def backselect(f: Callable, x: np.ndarray, fully_masked: np.ndarray, present: np.ndarray,
               mask_shape: tuple[int, ...], eval_batch: int) -> tuple[np.ndarray, np.ndarray]:
  """Backward selection of one input.

  Args:
    f: ``[B, *D] -> [B]`` on numpy arrays.
    x: ``D`` input; fully_masked: ``D`` replacement values.
    present: ``[d]`` bool, features present at the start (flat mask).
    mask_shape: the mask's shape left-padded with 1s to ``x.ndim`` (broadcasts onto ``D``).
    eval_batch: masked inputs per call of ``f``.

  Returns:
    ``(order [m] int64 flat mask indices, first removed first; values [m]`` score
    after each removal), ``m = present.sum()``.
  """
  present = present.copy()
  d = present.size
  m = int(present.sum())
  order = np.empty((m,), np.int64)
  values = []
  for t in range(m):
    candidates = np.flatnonzero(present)
    scores = []
    for start in range(0, candidates.size, eval_batch):
      chunk = candidates[start:start + eval_batch]
      keep = np.broadcast_to(present, (chunk.size, d)).copy()
      keep[np.arange(chunk.size), chunk] = False
      batch = np.where(keep.reshape((chunk.size,) + mask_shape), x[None], fully_masked[None])
      scores.append(scores_of(f, batch))
    scores = np.concatenate(scores)
    best = int(np.argmax(scores))  # first maximum: lowest index, candidates ascend
    order[t] = candidates[best]
    values.append(scores[best])
    present[candidates[best]] = False
  return order, np.asarray(values)
