"""JAX's persistent compilation cache, on by default in a user cache directory.

Compiling a selection program costs about a second even for a 10-feature score
(docs/benchmarks.md, "First call"), and a new process (a restarted notebook, the next
run of a script) would pay it again for every shape. JAX's persistent cache keeps
compiled programs on disk and loads them instead. It never changes a result: JAX keys
an entry on the whole compiled program, its compile options, the backend and the
versions of JAX and XLA.

Where and whether:
  * ``OVERINTERP_JAX_COMPILATION_CACHE`` (environment): ``0``/``false``/``off``/``no``
    turns it off; a path puts it there; unset, empty or ``1`` means the default,
    ``$XDG_CACHE_HOME/overinterp_jax/jax`` (else ``~/.cache/overinterp_jax/jax``);
  * the pipeline's ``config.runtime.compilation_cache`` (False turns it off; the
    environment's opt-out wins over True);
  * a directory the user gave JAX (``jax_compilation_cache_dir``, or the
    ``JAX_COMPILATION_CACHE_DIR`` environment variable) is used as it is: never
    overridden, and then JAX's own settings apply.

``sis`` turns it on when it first builds a program (not at import), so a directory
set after ``import overinterp_jax.sis`` but before the first selection still wins.
"""
from __future__ import annotations

import os

import jax

ENV = "OVERINTERP_JAX_COMPILATION_CACHE"
_OFF = ("0", "false", "off", "no")
_DEFAULT = ("", "1", "true", "on", "yes")
# Programs compiling for at least this long are written. JAX's default (1 s) would skip
# most selection programs of small problems, whose first call it is meant to speed up.
MIN_COMPILE_SECONDS = 0.05
_JAX_DEFAULT_MIN_COMPILE_SECONDS = 1.0

_chosen: bool | None = None  # config.runtime.compilation_cache, once given
_ours: str | None = None     # the directory this module gave JAX


def default_dir() -> str:
  """``$XDG_CACHE_HOME/overinterp_jax/jax``, or ``~/.cache/overinterp_jax/jax``."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "overinterp_jax", "jax")


def requested_dir(value: str | None = None) -> str | None:
  """The directory ``OVERINTERP_JAX_COMPILATION_CACHE`` (or ``value``) asks for; None = off."""
  value = os.environ.get(ENV, "") if value is None else value
  if value.strip().lower() in _OFF:
    return None
  if value.strip().lower() in _DEFAULT:
    return default_dir()
  return os.path.abspath(os.path.expanduser(value))


def use_persistent_cache(enabled: bool | None = None) -> str | None:
  """Points JAX's persistent cache at ``requested_dir()``, unless switched off or set by the user.

  Args:
    enabled: the pipeline's ``config.runtime.compilation_cache``, remembered for later
      calls; None (library use) keeps the last choice (default: on).

  Returns:
    The directory JAX caches in now, or None when the cache is off.
  """
  global _chosen, _ours
  if enabled is not None:
    _chosen = bool(enabled)
  current = jax.config.jax_compilation_cache_dir
  if current and current != _ours:
    return current  # the user's own directory
  wanted = requested_dir() if _chosen is not False else None
  if wanted == current:
    return current
  if wanted is not None:
    os.makedirs(wanted, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", wanted)
  min_seconds = jax.config.jax_persistent_cache_min_compile_time_secs
  if wanted is not None and min_seconds == _JAX_DEFAULT_MIN_COMPILE_SECONDS:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
  elif wanted is None and min_seconds == MIN_COMPILE_SECONDS:
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      _JAX_DEFAULT_MIN_COMPILE_SECONDS)
  if current is not None:  # JAX opens its cache once: let it open the new one
    from jax.experimental.compilation_cache import compilation_cache
    compilation_cache.reset_cache()
  _ours = wanted
  return wanted
