"""Atomic, self-validating result files: what a killed run leaves is never trusted.

Every artifact is an ``.npz`` written to a temporary name and renamed into
place (``os.replace`` is atomic on POSIX), so a file either is complete or
does not exist. Each file also records the *fingerprint* of the config that
produced it and a checksum of its arrays; ``load`` returns None (and the
caller recomputes) when the file is missing, unreadable, truncated, written
under another config, or fails the caller's shape checks.

Stage summaries are JSON files written the same way. On multi-host runs every
process computes the same results and only process 0 writes.

``write_atomic`` is the one atomic writer of the package. Inside ``recording()``
every file written through it, or read back valid by ``load``, is noted (plus
files named to ``note``), so the runner can tell which files a stage produced
and later check them cheaply (``describe_files`` / ``changed_files``: size and
sha256) before trusting the stage's marker.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import uuid
import zipfile
from typing import IO, Any, Callable, Iterator, Mapping, Optional

import numpy as np
from absl import logging

_META_KEYS = ("__fingerprint__", "__checksum__", "__reads__")


def fingerprint(*parts: Any) -> str:
  """A short stable hash of JSON-able config parts (ConfigDicts are converted)."""
  def plain(x):
    if hasattr(x, "to_dict"):
      return plain(x.to_dict())
    if isinstance(x, Mapping):
      return {str(k): plain(v) for k, v in sorted(x.items())}
    if isinstance(x, (list, tuple)):
      return [plain(v) for v in x]
    if isinstance(x, (np.integer, np.floating)):
      return x.item()
    return x
  text = json.dumps([plain(p) for p in parts], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def checksum(arrays: Mapping[str, np.ndarray]) -> str:
  h = hashlib.sha256()
  for name in sorted(arrays):
    a = np.ascontiguousarray(arrays[name])
    h.update(name.encode())
    h.update(str(a.dtype).encode())
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()


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


class WorkdirInUse(RuntimeError):
  """Another run holds the work directory (``workdir_lock``)."""


_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[bool]:
  """Holds ``workdir/.lock`` (an exclusive ``flock``) on the writing process while a run
  uses ``workdir``: a second run started on the same directory stops at once with the
  first one's pid instead of writing beside it. The operating system releases the lock
  when the holder exits, however it ends (``kill -9`` included), so a killed run never
  blocks its own resumption. Where the file system has no locks, a warning and no lock.

  Yields whether the run may write ``workdir``: False for an existing directory that
  cannot be written (read-only storage), where no lock is taken: a finished run's
  results can be read, and ``require_writable`` stops work that must write."""
  if not is_writer():
    yield True
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, ".lock")
  try:
    f = open(path, "a+")
  except OSError as e:
    if e.errno not in _NOT_WRITABLE:
      raise
    logging.warning("%s is not writable (%s): reading its results without a lock; a stage "
                    "that must run stops.", workdir, e.strerror)
    f = None
  if f is None:
    yield False
    return
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EAGAIN, errno.EACCES):
        f.seek(0)
        raise WorkdirInUse(f"{workdir} is in use by another run (pid "
                           f"{f.read().strip() or 'unknown'}, holding {path}); wait for it "
                           "to end or stop it.") from None
      logging.warning("No lock on %s (%s): make sure no other run uses this directory.",
                      workdir, e)
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    try:
      yield True
    finally:
      f.seek(0)
      f.truncate()


def require_writable(workdir: str, why: str) -> None:
  """PermissionError naming ``workdir`` when the writing process cannot write there
  (read-only storage), before work whose results it would have to write (``why``)."""
  if is_writer() and os.path.isdir(workdir) and not os.access(workdir, os.W_OK):
    raise PermissionError(f"{workdir} is not writable, but {why}: give a writable "
                          "--workdir (a copy of this one keeps its results).")


def _stamp(fp) -> tuple[str, Any]:
  """``(fingerprint, what to store for its check)`` of ``fp``: a string, or a
  ``config_reads.Key`` (the config paths its producer read)."""
  return (fp, None) if isinstance(fp, str) else fp.stamp()


def save(path: str, arrays: Mapping[str, np.ndarray], fp) -> None:
  """Writes ``arrays`` (name -> array) to ``path`` atomically, tagged with ``fp`` (a string,
  or a ``config_reads.Key``: then also the config paths its producer read)."""
  bad = [k for k in arrays if k in _META_KEYS]
  if bad:
    raise ValueError(f"Array names {bad} are reserved.")
  if not is_writer():
    return
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  fingerprint_, reads = _stamp(fp)
  meta = {} if reads is None else {"__reads__": np.array(json.dumps(reads))}
  write_atomic(path, lambda fh: np.savez(fh, __fingerprint__=np.array(fingerprint_),
                                         __checksum__=np.array(checksum(arrays)), **meta,
                                         **arrays),
               binary=True)


def load(path: str, fp, check: Optional[Callable[[dict], Optional[str]]] = None
         ) -> Optional[dict]:
  """The arrays of ``path``, or None if it is missing or fails validation.

  ``check(arrays)`` returns an error string for content the caller rejects
  (wrong shapes, counts); a rejected file is logged and treated as missing.
  """
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    logging.warning("Ignoring unreadable %s (%s); it will be recomputed.", path, e)
    return None
  problem = None
  reads = json.loads(str(arrays.pop("__reads__"))) if "__reads__" in arrays else None
  expected = fp if isinstance(fp, str) else None if reads is None else fp.expected(reads)
  if any(k not in arrays for k in _META_KEYS[:2]):
    problem = "no fingerprint/checksum"
  elif str(arrays.pop("__fingerprint__")) != expected:
    problem = "written under a different config"
  elif str(arrays.pop("__checksum__")) != checksum(arrays):
    problem = "checksum mismatch"
  elif check is not None:
    problem = check(arrays)
  if problem:
    logging.warning("Ignoring %s (%s); it will be recomputed.", path, problem)
    return None
  if not isinstance(fp, str):
    fp.used(reads)
  note(path)
  return arrays


def save_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically (process 0 only)."""
  if not is_writer():
    return
  write_atomic(path, lambda fh: fh.write(json.dumps(obj, indent=1) + "\n"))


def load_json(path: str, fp: Optional[str] = None) -> Optional[dict]:
  """JSON object of ``path``; None if missing, unreadable, or its ``fingerprint`` differs."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as fh:
      obj = json.load(fh)
  except (OSError, ValueError) as e:
    logging.warning("Ignoring unreadable %s (%s).", path, e)
    return None
  if fp is not None and obj.get("fingerprint") != fp:
    logging.info("Ignoring %s: written under a different config.", path)
    return None
  return obj


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as fh:
    for block in iter(lambda: fh.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def describe_files(root: str, paths) -> dict:
  """``{path relative to root: [bytes, sha256]}`` of the existing files among ``paths``
  (absolute) under ``root``, sorted."""
  root = os.path.abspath(root)
  out = {}
  for p in sorted(paths):
    rel = os.path.relpath(p, root)
    if os.path.isfile(p) and not rel.startswith(os.pardir):
      out[rel] = [os.path.getsize(p), file_sha256(p)]
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
    elif file_sha256(p) != digest:
      problems.append(f"{rel} changed (sha256 differs)")
  return problems
