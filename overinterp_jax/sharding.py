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
  """A 1-D mesh over ``devices`` (default: every device of every process).

  The axis type is ``Auto``: the partitioner propagates shardings itself,
  and ``shard_map`` regions state theirs explicitly.
  """
  devices = list(devices) if devices is not None else jax.devices()
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


def process_slice(global_size: int) -> slice:
  """This process's contiguous share of a global batch of ``global_size`` rows."""
  count, index = jax.process_count(), jax.process_index()
  if global_size % count:
    raise ValueError(f"Global batch {global_size} is not divisible by {count} processes.")
  per = global_size // count
  return slice(index * per, (index + 1) * per)


def global_batch(mesh: Mesh, local_rows: np.ndarray) -> jax.Array:
  """A batch sharded over ``mesh``'s data axis from this process's rows.

  One process: the rows are the whole batch. Several: each process passes
  its ``process_slice`` and the result is the global batch across them.
  """
  spec = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(local_rows, spec)
  return jax.make_array_from_process_local_data(spec, local_rows)


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly multi-process) sharded array as numpy, on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def replicated_to_host(x) -> np.ndarray:
  """A full copy, as numpy, of an array that every device holding it holds whole (on one
  device, or replicated over a mesh of any number of processes), or of a numpy array."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  if not x.sharding.is_fully_replicated:
    raise ValueError(f"An array sharded as {x.sharding} is not replicated; use to_host.")
  return np.asarray(x.addressable_data(0))


def put_replicated(mesh: Mesh, tree):
  """``tree`` with every array leaf a full copy on every device of ``mesh``.

  Leaves already replicated over ``mesh`` are kept as they are (no copy); numpy arrays and
  arrays placed elsewhere (one device, another mesh) are copied. Parameters restored or
  loaded onto one device thus feed programs sharded over the mesh. Other leaves (Python
  scalars, None) are left alone.
  """
  spec = replicated(mesh)

  def place(x):
    if not isinstance(x, (jax.Array, np.ndarray)):
      return x
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(spec, x.ndim):
      return x
    if jax.process_count() == 1:
      return jax.device_put(x, spec)
    return jax.make_array_from_process_local_data(spec, replicated_to_host(x))

  return jax.tree.map(place, tree)


def shard_rows(mesh: Mesh, rows) -> jax.Array:
  """``rows`` (the same on every process) sharded over ``mesh``'s data axis."""
  rows = np.asarray(rows) if not isinstance(rows, jax.Array) else rows
  if jax.process_count() == 1:
    return jax.device_put(rows, batch_sharding(mesh))
  return global_batch(mesh, np.asarray(rows[process_slice(rows.shape[0])]))
