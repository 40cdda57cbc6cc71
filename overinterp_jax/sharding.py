"""Device mesh and batch padding: one code path from 1 CPU to many accelerators.

Every data-parallel computation in the package (SIS backward selection,
training, evaluation) shards its leading batch axis over the mesh axis
``DATA_AXIS`` of the mesh built here. On a multi-host run, call
``jax.distributed.initialize()`` first (see ``launch/``); each process then
builds its mesh from its local devices and works on its own share of the data.
"""
from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: this process's local devices).

  The axis type is ``Auto``: the partitioner propagates shardings itself,
  and ``shard_map`` regions state theirs explicitly.
  """
  devices = list(devices) if devices is not None else jax.local_devices()
  if not devices:
    raise ValueError("data_mesh needs at least one device.")
  return Mesh(np.array(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding that splits axis 0 over the mesh's data axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that puts a full copy on every device of the mesh."""
  return NamedSharding(mesh, P())


def pad_batch(x: np.ndarray | jax.Array, multiple: int):
  """Pads axis 0 of ``x`` to a multiple of ``multiple`` by repeating row 0.

  Repeating a real row (not zeros) keeps padded rows numerically harmless:
  they cannot produce NaN scores or fake errors. Returns ``(padded, n)`` with
  ``n`` the original length, so callers slice ``[:n]`` from the results.
  """
  n = x.shape[0]
  if n == 0:
    raise ValueError("Cannot pad an empty batch.")
  extra = (-n) % multiple
  if extra == 0:
    return x, n
  xp = jax.numpy if isinstance(x, jax.Array) else np
  filler = xp.broadcast_to(x[:1], (extra,) + tuple(x.shape[1:]))
  return xp.concatenate([x, filler], axis=0), n
