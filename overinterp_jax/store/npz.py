"""Self-validating array files: what a killed run or another config left is never trusted.

Every result file is an ``.npz`` written atomically (``atomic.write_atomic``) that also
records the *fingerprint* of the config that produced it and a checksum of its arrays;
``load`` returns None (and the caller recomputes) when the file is missing, unreadable,
truncated, written under another config, or fails the caller's shape checks. A file read
back valid is noted in the open ``atomic.recording()``s.
"""
from __future__ import annotations

import json
import os
import zipfile
from typing import Any, Callable, Mapping, Optional, Protocol, Union

import numpy as np
from absl import logging

from overinterp_jax.store import atomic, hashing

_META_KEYS = ("__fingerprint__", "__checksum__", "__reads__")


class ResultKey(Protocol):
  """What ``save`` and ``load`` use of a ``config_reads.Key`` (which this layer cannot
  import): the fingerprint plus the config paths its producer read."""

  def stamp(self) -> tuple[str, dict]: ...

  def expected(self, stored: dict) -> str: ...

  def used(self, stored: dict) -> None: ...


# A result file's key: a fingerprint string, or a ``config_reads.Key``.
KeyOrFingerprint = Union[str, ResultKey]


def _stamp(key: KeyOrFingerprint) -> tuple[str, Any]:
  """``(fingerprint, what to store for its check)`` of ``key``: a fingerprint string, or a
  ``config_reads.Key`` (the config paths its producer read)."""
  return (key, None) if isinstance(key, str) else key.stamp()


def save(path: str, arrays: Mapping[str, np.ndarray], key: KeyOrFingerprint) -> None:
  """Writes ``arrays`` (name -> array) to ``path`` atomically, tagged with ``key`` (a
  fingerprint string, or a ``config_reads.Key``: then also the config paths its producer
  read)."""
  bad = [k for k in arrays if k in _META_KEYS]
  if bad:
    raise ValueError(f"Array names {bad} are reserved.")
  if not atomic.is_writer():
    return
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  fingerprint_, reads = _stamp(key)
  meta = {} if reads is None else {"__reads__": np.array(json.dumps(reads))}
  atomic.write_atomic(path, lambda fh: np.savez(
      fh, __fingerprint__=np.array(fingerprint_),
      __checksum__=np.array(hashing.checksum(arrays)), **meta, **arrays), binary=True)


def load(path: str, key: KeyOrFingerprint, check: Optional[Callable[[dict], Optional[str]]] = None
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
  expected = key if isinstance(key, str) else None if reads is None else key.expected(reads)
  if any(k not in arrays for k in _META_KEYS[:2]):
    problem = "no fingerprint/checksum"
  elif str(arrays.pop("__fingerprint__")) != expected:
    problem = "written under a different config"
  elif str(arrays.pop("__checksum__")) != hashing.checksum(arrays):
    problem = "checksum mismatch"
  elif check is not None:
    problem = check(arrays)
  if problem:
    logging.warning("Ignoring %s (%s); it will be recomputed.", path, problem)
    return None
  if not isinstance(key, str):
    key.used(reads)
  atomic.note(path)
  return arrays
