"""Timing helpers shared by the benchmark scripts."""
from __future__ import annotations

import time

# Dense bfloat16 peak FLOP/s per chip, from the vendors' data sheets.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
                   "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
                   "TPU v5p": 459e12, "TPU v6 lite": 918e12}


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
