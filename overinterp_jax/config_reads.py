"""Which config values a piece of code reads: the dependencies of every cached result.

``RecordingConfig`` wraps a ``ConfigDict`` and behaves like it (attributes,
``[]``, ``in``, iteration, ``items()``, ``to_dict()``,
``copy_and_resolve_references()``, ``unlocked()``). Each value read through it
adds its dotted path (``"subsets.frac_kept"``) to every ``recording()`` open at
the time; a subtree converted, hashed or iterated adds the subtree's path
(``"backselect"``; ``""`` is the whole config). Keys under ``runtime`` are never
recorded: they say how a run executes, not what it computes.

A cached result stores the paths its producer read and the hash of their
values (``values_fingerprint``); it is valid for a config whose values at those
paths hash the same. So a key the producer read, when changed, invalidates it,
and a key it never read does not, with no list kept by hand. A key added to the
schema after a result was made could not be read by its producer: the result also
stores the keys that existed (``leaf_paths``), and a newer key away from its
schema default invalidates it (``changed_new_keys``). ``Key`` carries this for
result files (``npz.save`` / ``npz.load``).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterable, Iterator, Optional

import ml_collections

from overinterp_jax.config_schema import RUNTIME, base_config
from overinterp_jax.store import hashing

_MISSING = "<missing>"


class Reads:
  """The paths read while a ``recording()`` is open; ``on_new(paths)`` runs after each new
  one (e.g. to keep an in-progress marker up to date)."""

  def __init__(self, on_new: Optional[Callable[[set], None]] = None):
    self.paths: set = set()
    self.on_new = on_new

  def add(self, path: str) -> None:
    if path not in self.paths:
      self.paths.add(path)
      if self.on_new is not None:
        self.on_new(self.paths)


_RECORDINGS: list[Reads] = []


@contextlib.contextmanager
def recording(reads: Optional[Reads] = None) -> Iterator[Reads]:
  """Collects the paths read through any ``RecordingConfig`` while it is open."""
  reads = Reads() if reads is None else reads
  _RECORDINGS.append(reads)
  try:
    yield reads
  finally:
    _RECORDINGS.remove(reads)


@contextlib.contextmanager
def paused() -> Iterator[None]:
  """Reads made inside go to no recording open outside (recordings opened inside still
  collect): for an earlier stage's result loaded late, which that stage's fingerprint
  already covers."""
  saved = _RECORDINGS[:]
  _RECORDINGS.clear()
  try:
    yield
  finally:
    _RECORDINGS[:] = saved


def replay(paths: Iterable[str]) -> None:
  """Records ``paths`` as read: what a cached result's producer read, when the result is
  reused, so a consumer's recorded reads are the same whether it was computed or loaded."""
  for path in paths:
    _record(path)


def _record(path: str) -> None:
  if _runtime(path):
    return
  for r in list(_RECORDINGS):
    r.add(path)


def _join(prefix: str, key: str) -> str:
  return f"{prefix}.{key}" if prefix else key


class RecordingConfig:
  """A ``ConfigDict`` (or a subtree of one, at ``prefix``) whose reads are recorded."""

  def __init__(self, config: ml_collections.ConfigDict, prefix: str = ""):
    object.__setattr__(self, "_config", config)
    object.__setattr__(self, "_prefix", prefix)

  def _get(self, key: str):
    value = self._config[key]
    path = _join(self._prefix, key)
    if isinstance(value, ml_collections.ConfigDict):
      return RecordingConfig(value, path)
    _record(path)
    return value

  def _whole(self) -> ml_collections.ConfigDict:
    _record(self._prefix)
    return self._config

  def __getattr__(self, name: str):
    if name.startswith("_"):
      raise AttributeError(name)
    try:
      return self._get(name)
    except KeyError:
      raise AttributeError(f"config.{_join(self._prefix, name)} does not exist.") from None

  def __getitem__(self, key: str):
    return self._get(key)

  def __setattr__(self, name: str, value) -> None:
    setattr(self._config, name, value)

  def __setitem__(self, key: str, value) -> None:
    self._config[key] = value

  def __contains__(self, key: str) -> bool:
    _record(_join(self._prefix, key))
    return key in self._config

  def __iter__(self):
    return iter(self._whole())

  def __len__(self) -> int:
    return len(self._whole())

  def keys(self):
    return self._whole().keys()

  def items(self):
    return self._whole().items()

  def values(self):
    return self._whole().values()

  def to_dict(self) -> dict:
    return self._whole().to_dict()

  def to_json_best_effort(self, **kwargs) -> str:
    return self._whole().to_json_best_effort(**kwargs)

  def copy_and_resolve_references(self) -> "RecordingConfig":
    """A recording copy: its reads are recorded at the same paths."""
    return RecordingConfig(self._config.copy_and_resolve_references(), self._prefix)

  def unlocked(self):
    return self._config.unlocked()

  def __repr__(self) -> str:
    return f"RecordingConfig({self._prefix!r}, {self._config!r})"


def recording_view(config) -> RecordingConfig:
  """``config`` as a ``RecordingConfig`` (itself if it is one)."""
  return config if isinstance(config, RecordingConfig) else RecordingConfig(config)


def plain(config) -> ml_collections.ConfigDict:
  """The ``ConfigDict`` under a ``RecordingConfig`` (reading it records nothing)."""
  return config._config if isinstance(config, RecordingConfig) else config


def value_at(config, path: str) -> Any:
  """The JSON-able value of ``config`` at dotted ``path`` (``""``: all of it but
  ``runtime``); ``"<missing>"`` when there is no such key."""
  node = plain(config)
  for part in path.split(".") if path else []:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return _MISSING
    node = node[part]
  if isinstance(node, ml_collections.ConfigDict):
    node = node.to_dict()
    if not path:
      node.pop(RUNTIME, None)
  return node


def values_fingerprint(config, paths: Iterable[str]) -> str:
  """A hash of ``config``'s values at ``paths`` (``value_at``), runtime keys excluded."""
  paths = sorted(p for p in set(paths) if not _runtime(p))
  return hashing.fingerprint({p: value_at(config, p) for p in paths})


def _runtime(path: str) -> bool:
  return path == RUNTIME or path.startswith(RUNTIME + ".")


def leaf_paths(config) -> list[str]:
  """Every leaf's dotted path in ``config``, runtime keys excluded, sorted."""
  def walk(node, prefix):
    for key in node.keys():
      path = _join(prefix, key)
      if isinstance(node[key], ml_collections.ConfigDict):
        yield from walk(node[key], path)
      elif not _runtime(path):
        yield path
  return sorted(walk(plain(config), ""))


@functools.lru_cache(maxsize=1)
def _schema_defaults() -> dict:
  base = base_config()
  return {p: value_at(base, p) for p in leaf_paths(base)}


def changed_new_keys(config, known: Iterable[str]) -> list[str]:
  """The leaves of ``config`` missing from ``known`` (the keys that existed when a result
  was made) whose value is not the schema's default."""
  known, defaults = set(known), _schema_defaults()
  return [p for p in leaf_paths(config)
          if p not in known and value_at(config, p) != defaults.get(p, _MISSING)]


class Key:
  """The key of a result file: ``base`` (a fingerprint of what the producer was given:
  upstream results, arguments) plus the config values the producer read so far
  (``reads``, a live recording). ``npz.save`` stores ``stamp()``'s paths with the
  file; ``npz.load`` accepts the file iff ``expected(stored paths)`` matches."""

  def __init__(self, base: str, config, reads: Reads):
    self.base, self.config, self.reads = base, plain(config), reads

  def child(self, *parts) -> "Key":
    """The key of a part of this result (shares the recording)."""
    return Key(hashing.fingerprint(self.base, *parts), self.config, self.reads)

  def expected(self, stored: dict) -> str:
    """The fingerprint a result must carry, given what ``stamp`` stored with it."""
    if changed_new_keys(self.config, stored["known"]):
      return "<a newer config key is set>"
    return hashing.fingerprint(self.base, values_fingerprint(self.config, stored["reads"]))

  def used(self, stored: dict) -> None:
    """A result with ``stored`` was reused: its producer's reads count as read now."""
    replay(stored["reads"])

  def stamp(self) -> tuple[str, dict]:
    """``(fingerprint, {"reads": paths read so far, "known": the config's keys})`` to store
    with a result written now."""
    stored = {"reads": sorted(self.reads.paths), "known": leaf_paths(self.config)}
    return self.expected(stored), stored
