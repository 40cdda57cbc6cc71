"""Orbax checkpoints that are verified when restored.

``save`` stores the sha256 of every array of a train state in
``<workdir>/checkpoint_sha256/<step>.json`` before the orbax checkpoint
``<workdir>/checkpoints/<step>`` is written, so a checkpoint that exists has its
checksums. ``restore_latest`` restores the newest checkpoint whose arrays read
back with those checksums; one that cannot be read or does not match is named
in an error log and deleted, and the next older one is tried. A checkpoint
written before checksums existed is used with a warning and its checksums
stored from then on.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from overinterp_jax import sharding
from overinterp_jax.store import atomic, hashing


def manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         enable_async_checkpointing=False)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def state_digests(state: Any) -> dict[str, str]:
  """sha256 of every array of ``state`` (a pytree: step, params, batch_stats, opt_state)
  by tree path."""
  return {jax.tree_util.keystr(path): hashing.checksum({"": sharding.to_host(leaf)})
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def files(workdir: str, step: int, name: str = "checkpoints") -> list[str]:
  """Checkpoint ``step`` of the manager ``workdir/name`` (epoch-end checkpoints:
  ``checkpoints``, numbered by epoch): its orbax directory and its checksums."""
  digests = "checkpoint_sha256" if name == "checkpoints" else f"{name}_sha256"
  return [os.path.join(workdir, name, str(step)),
          os.path.join(workdir, digests, f"{step}.json")]


def save(mgr: ocp.CheckpointManager, workdir: str, step: int, state: Any,
         name: str = "checkpoints") -> None:
  """Checksums first, then the orbax checkpoint; checksums of steps orbax no longer keeps
  are removed."""
  digest_path = files(workdir, step, name)[1]
  atomic.save_json(digest_path, {"step": step, "sha256": state_digests(state)})
  mgr.save(step, args=ocp.args.StandardSave(state))
  mgr.wait_until_finished()
  if atomic.is_writer():
    kept = {f"{s}.json" for s in mgr.all_steps()}
    for name in os.listdir(os.path.dirname(digest_path)):
      if name.endswith(".json") and name not in kept:
        os.remove(os.path.join(os.path.dirname(digest_path), name))


def restore_verified(mgr: ocp.CheckpointManager, workdir: str, step: int, template: Any,
                     name: str = "checkpoints") -> Any:
  """Checkpoint ``step`` restored into ``template``'s structure if it reads back with the
  sha256 stored for each array; otherwise None, after an error log naming the checkpoint."""
  where, digest_path = files(workdir, step, name)
  try:
    state = mgr.restore(step, args=ocp.args.StandardRestore(template))
  except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore: many types
    logging.error("Checkpoint %s cannot be read (%s: %.200s).", where, type(e).__name__,
                  str(e).splitlines()[0] if str(e) else "")
    return None
  digests = state_digests(state)
  stored = atomic.load_json(digest_path)
  if stored is None and os.path.exists(digest_path):
    logging.error("Checkpoint %s: its checksums %s cannot be read.", where, digest_path)
    return None
  if stored is None:
    logging.warning("Checkpoint %s has no stored checksums (written by an older version): "
                    "used unverified; its checksums are stored now.", where)
    atomic.save_json(digest_path, {"step": step, "sha256": digests})
    return state
  bad = sorted(k for k in set(digests) | set(stored["sha256"])
               if digests.get(k) != stored["sha256"].get(k))
  if bad:
    logging.error("Checkpoint %s is corrupt: %d of its %d arrays differ from the sha256 "
                  "stored when it was written (%s%s).", where, len(bad), len(digests),
                  ", ".join(bad[:3]), ", ..." if len(bad) > 3 else "")
    return None
  return state


def restore_latest(mgr: ocp.CheckpointManager, workdir: str, template: Any,
                   name: str = "checkpoints") -> tuple[int, Any]:
  """``(step, state)`` of the newest checkpoint that passes its checksums (``template``
  gives the structure); those that fail are deleted. ``(0, None)`` when none is left."""
  for step in sorted(mgr.all_steps(), reverse=True):
    state = restore_verified(mgr, workdir, step, template, name)
    if state is not None:
      return step, state
    mgr.delete(step)
    where, digest_path = files(workdir, step, name)
    if atomic.is_writer() and os.path.exists(digest_path):
      os.remove(digest_path)
    logging.error("Deleted checkpoint %s; training again from %s.", where,
                  "the previous checkpoint" if mgr.all_steps() else "scratch")
  return 0, None
