"""Fingerprints and checksums: what tells a result file's config and content apart.

``fingerprint`` hashes JSON-able config parts to a short key (a result file records the
key of the config that produced it); ``checksum`` hashes named arrays (dtype, shape and
bytes); ``file_sha256`` hashes a file's bytes.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import numpy as np


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
  """sha256 (hex) of named arrays: their names, dtypes, shapes and bytes."""
  h = hashlib.sha256()
  for name in sorted(arrays):
    a = np.ascontiguousarray(arrays[name])
    h.update(name.encode())
    h.update(str(a.dtype).encode())
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
  return h.hexdigest()


def file_sha256(path: str) -> str:
  """sha256 (hex) of the bytes of the file ``path``, read 1 MiB at a time."""
  h = hashlib.sha256()
  with open(path, "rb") as fh:
    for block in iter(lambda: fh.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()
