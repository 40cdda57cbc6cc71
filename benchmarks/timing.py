"""Timing helpers shared by the benchmark scripts."""
from __future__ import annotations

import time


def rate(fn, batch: int, min_seconds: float = 3.0, rounds: int = 3) -> float:
  """Best items/s of ``fn`` (which handles ``batch`` items per call and blocks until
  done) over ``rounds`` rounds of at least ``min_seconds`` each, after one warm-up call."""
  fn()
  best = 0.0
  for _ in range(rounds):
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
      fn()
      calls += 1
    best = max(best, calls * batch / (time.perf_counter() - t0))
  return best
