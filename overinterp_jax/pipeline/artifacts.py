"""Atomic, self-validating result files: what a killed run leaves is never trusted.

Every artifact is an ``.npz`` written to a temporary name and renamed into
place (``os.replace`` is atomic on POSIX), so a file either is complete or
does not exist. Each file also records the *fingerprint* of the config that
produced it and a checksum of its arrays; ``load`` returns None (and the
caller recomputes) when the file is missing, unreadable, truncated, written
under another config, or fails the caller's shape checks.

Stage summaries are JSON files written the same way. On multi-host runs every
process computes the same results and only process 0 writes.
"""
from __future__ import annotations

import hashlib
import json
import os
import zipfile
from typing import Any, Callable, Mapping, Optional

import numpy as np
from absl import logging

_META_KEYS = ("__fingerprint__", "__checksum__")


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


def _fsync_replace(tmp: str, path: str) -> None:
  with open(tmp, "rb") as fh:
    os.fsync(fh.fileno())
  os.replace(tmp, path)


def is_writer() -> bool:
  """True on the process that writes files (process 0)."""
  import jax
  return jax.process_index() == 0


def save(path: str, arrays: Mapping[str, np.ndarray], fp: str) -> None:
  """Writes ``arrays`` (name -> array) to ``path`` atomically, tagged with ``fp``."""
  bad = [k for k in arrays if k in _META_KEYS]
  if bad:
    raise ValueError(f"Array names {bad} are reserved.")
  if not is_writer():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  tmp = f"{path}.tmp.npz"
  np.savez(tmp, __fingerprint__=np.array(fp), __checksum__=np.array(checksum(arrays)),
           **arrays)
  _fsync_replace(tmp, path)


def load(path: str, fp: str, check: Optional[Callable[[dict], Optional[str]]] = None
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
  if any(k not in arrays for k in _META_KEYS):
    problem = "no fingerprint/checksum"
  elif str(arrays.pop("__fingerprint__")) != fp:
    problem = "written under a different config"
  elif str(arrays.pop("__checksum__")) != checksum(arrays):
    problem = "checksum mismatch"
  elif check is not None:
    problem = check(arrays)
  if problem:
    logging.warning("Ignoring %s (%s); it will be recomputed.", path, problem)
    return None
  return arrays


def save_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as JSON to ``path`` atomically (process 0 only)."""
  if not is_writer():
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as fh:
    json.dump(obj, fh, indent=1)
    fh.write("\n")
  _fsync_replace(tmp, path)


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
