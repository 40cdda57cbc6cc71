"""Atomic files: a file either is its old self or complete, never partial.

``write_atomic`` is the one atomic writer of the package: it writes to a temporary name
and renames it into place (``os.replace`` is atomic on POSIX). Stage summaries are JSON
files written the same way (``save_json`` / ``load_json``). On multi-host runs every
process computes the same results and only process 0 writes (``is_writer``).

Inside ``recording()`` every file written through ``write_atomic``, or read back valid
by ``npz.load``, is noted (plus files named to ``note``), so the runner can tell which
files a stage produced and later check them cheaply (``describe_files`` /
``changed_files``: size and sha256) before trusting the stage's marker.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import uuid
from typing import IO, Any, Callable, Iterator, Mapping, Optional

from absl import logging

from overinterp_jax.store import hashing

_RECORDINGS: list[set] = []


@contextlib.contextmanager
def recording() -> Iterator[set]:
  """Collects the absolute paths of the files written or validly read while it is open."""
  paths: set = set()
  _RECORDINGS.append(paths)
  try:
    yield paths
  finally:
    _RECORDINGS.remove(paths)


def note(path: str) -> None:
  """Adds ``path`` (a file, or every file under a directory) to the open recordings."""
  if not _RECORDINGS:
    return
  path = os.path.abspath(path)
  files = [path] if not os.path.isdir(path) else [
      os.path.join(root, f) for root, _, names in os.walk(path) for f in names]
  for r in _RECORDINGS:
    r.update(files)


# Temporary files of write_atomic: <path>.<pid>.<host tag>.<random>.tmp, so that a later
# process can tell one a killed writer left (``sweep_stale_tmp``) from one being written.
_HOST_TAG = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]
_TMP_NAME = re.compile(r"\.(\d+)\.([0-9a-f]{6})\.[0-9a-f]{8}\.tmp$")
_SWEPT_DIRS: set = set()


def _pid_alive(pid: int) -> bool:
  if pid == os.getpid():
    return True
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


def sweep_stale_tmp(directory: str) -> list[str]:
  """Deletes the temporary files of ``write_atomic`` in ``directory`` whose writer, a
  process of this host, no longer runs (``kill -9`` between creating and renaming one);
  returns their paths. Files of live writers, other hosts or other names are kept."""
  removed = []
  try:
    entries = list(os.scandir(directory))
  except (FileNotFoundError, NotADirectoryError):
    return removed
  for entry in entries:
    m = _TMP_NAME.search(entry.name)
    if m and m.group(2) == _HOST_TAG and not _pid_alive(int(m.group(1))):
      try:
        os.remove(entry.path)
        removed.append(entry.path)
      except OSError:  # swept by another process already, or not ours to delete
        pass
  return removed


def write_atomic(path: str, write: Callable[[IO], None], binary: bool = False) -> None:
  """Calls ``write(file)`` on a temporary file of its own, syncs it and renames it to
  ``path``: ``path`` is either its old self or complete, never partial, even when several
  processes write it at once. The first write of a process into a directory deletes the
  temporary files killed writers left there (``sweep_stale_tmp``)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  if directory not in _SWEPT_DIRS:
    _SWEPT_DIRS.add(directory)
    for stale in sweep_stale_tmp(directory):
      logging.info("Deleted %s, left by a killed run.", stale)
  tmp = f"{path}.{os.getpid()}.{_HOST_TAG}.{uuid.uuid4().hex[:8]}.tmp"
  try:
    with open(tmp, "xb" if binary else "x") as fh:
      write(fh)
      fh.flush()
      os.fsync(fh.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  note(path)


def is_writer() -> bool:
  """True on the process that writes files (process 0)."""
  import jax
  return jax.process_index() == 0


def save_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically (process 0 only)."""
  if not is_writer():
    return
  write_atomic(path, lambda fh: fh.write(json.dumps(obj, indent=1) + "\n"))


def load_json(path: str, fingerprint: Optional[str] = None) -> Optional[dict]:
  """JSON object of ``path``; None if missing, unreadable, or its ``fingerprint`` differs."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as fh:
      obj = json.load(fh)
  except (OSError, ValueError) as e:
    logging.warning("Ignoring unreadable %s (%s).", path, e)
    return None
  if fingerprint is not None and obj.get("fingerprint") != fingerprint:
    logging.info("Ignoring %s: written under a different config.", path)
    return None
  return obj


def describe_files(root: str, paths) -> dict:
  """``{path relative to root: [bytes, sha256]}`` of the existing files among ``paths``
  (absolute) under ``root``, sorted."""
  root = os.path.abspath(root)
  out = {}
  for p in sorted(paths):
    rel = os.path.relpath(p, root)
    if os.path.isfile(p) and not rel.startswith(os.pardir):
      out[rel] = [os.path.getsize(p), hashing.file_sha256(p)]
  return out


def changed_files(root: str, described: Mapping[str, Any]) -> list[str]:
  """The problems of files ``describe_files`` described: missing, resized or changed
  (sha256 checked only when the size matches); empty when all are as described."""
  problems = []
  for rel, (size, digest) in described.items():
    p = os.path.join(root, rel)
    if not os.path.isfile(p):
      problems.append(f"{rel} is missing")
    elif os.path.getsize(p) != size:
      problems.append(f"{rel} has {os.path.getsize(p)} bytes, not {size}")
    elif hashing.file_sha256(p) != digest:
      problems.append(f"{rel} changed (sha256 differs)")
  return problems
