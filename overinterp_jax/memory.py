"""How much device memory a program may use, and batch sizes that fit it.

On GPUs and TPUs the budget is a fraction of the memory the device's
allocator may hand out (``device.memory_stats()["bytes_limit"]``), not of what
is free at the moment, so the same device gives the same batch sizes (and the
same results) in every run; where a backend reports none (the CPU) it is a
fixed 1 GiB. A batch that fits is found from XLA's memory analysis of the
compiled program at a small probe batch, never from a constant tuned for one
machine.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax

CPU_BUDGET_BYTES = 1 << 30
DEVICE_FRACTION = 0.5   # of the allocator's limit: room for parameters, data, XLA's own buffers
PROBE_BATCH = 8


_NO_STATS: set = set()  # platforms that report no memory statistics


def device_budget_bytes(device: Optional[jax.Device] = None,
                        fraction: float = DEVICE_FRACTION) -> int:
  """Bytes one program may use on ``device`` (default: the first local device)."""
  if device is None and jax.default_backend() in _NO_STATS:
    return CPU_BUDGET_BYTES
  device = device or jax.local_devices()[0]
  if device.platform in _NO_STATS:
    return CPU_BUDGET_BYTES
  try:
    stats = device.memory_stats()
  except Exception:  # backends without memory statistics
    stats = None
  if not stats or "bytes_limit" not in stats:
    _NO_STATS.add(device.platform)
    return CPU_BUDGET_BYTES
  return max(1, int(int(stats["bytes_limit"]) * fraction))


def bytes_per_example(fn: Callable, args_at: Callable[[int], tuple]) -> Optional[int]:
  """XLA's temporary + output bytes of ``jit(fn)(*args_at(b))`` per example, or None.

  ``args_at(b)`` gives the arguments (arrays or ``ShapeDtypeStruct``) for batch ``b``.
  """
  try:
    compiled = jax.jit(fn).lower(*args_at(PROBE_BATCH)).compile()
    stats = compiled.memory_analysis()
  except Exception:
    return None
  if stats is None:
    return None
  total = int(stats.temp_size_in_bytes) + int(stats.output_size_in_bytes)
  return max(1, total // PROBE_BATCH)


def fit_batch(fn: Callable, args_at: Callable[[int], tuple], *, budget_bytes: int, cap: int,
              input_bytes: int, fallback_factor: int = 64) -> int:
  """The largest batch ``<= cap`` whose ``fn`` fits ``budget_bytes``.

  Per example: XLA's analysis plus 4 input-sized buffers, or, without an
  analysis, ``fallback_factor`` input-sized buffers.
  """
  measured = bytes_per_example(fn, args_at)
  per_example = (fallback_factor * input_bytes if measured is None
                 else measured + 4 * input_bytes)
  return int(max(1, min(cap, budget_bytes // max(per_example, 1))))
