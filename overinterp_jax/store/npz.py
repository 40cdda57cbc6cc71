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
from typing import Any, Callable, Mapping, Optional

import numpy as np
from absl import logging

from overinterp_jax.store import atomic, hashing

_META_KEYS = ("__fingerprint__", "__checksum__", "__reads__")


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
  if not atomic.is_writer():
    return
  arrays = {k: np.asarray(v) for k, v in arrays.items()}
  fingerprint_, reads = _stamp(fp)
  meta = {} if reads is None else {"__reads__": np.array(json.dumps(reads))}
  atomic.write_atomic(path, lambda fh: np.savez(
      fh, __fingerprint__=np.array(fingerprint_),
      __checksum__=np.array(hashing.checksum(arrays)), **meta, **arrays), binary=True)


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
  elif str(arrays.pop("__checksum__")) != hashing.checksum(arrays):
    problem = "checksum mismatch"
  elif check is not None:
    problem = check(arrays)
  if problem:
    logging.warning("Ignoring %s (%s); it will be recomputed.", path, problem)
    return None
  if not isinstance(fp, str):
    fp.used(reads)
  atomic.note(path)
  return arrays
