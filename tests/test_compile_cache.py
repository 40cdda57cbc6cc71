"""JAX's persistent compilation cache: on by default in a user directory, off on request,
never over a directory the user set, and never a different result (issue 28, item 3)."""
import json
import os
import subprocess
import sys

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from overinterp_jax import compile_cache


@pytest.fixture
def restored(monkeypatch):
  """Restores JAX's cache settings and this module's memory of them after the test."""
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  saved = {k: getattr(jax.config, k) for k in keys}
  state = (compile_cache._chosen, compile_cache._ours)
  yield monkeypatch
  for k, v in saved.items():
    jax.config.update(k, v)
  compile_cache._chosen, compile_cache._ours = state
  jax_cache.reset_cache()


@pytest.mark.parametrize("value", ["0", "false", "OFF", "no"])
def test_opt_out_values(value):
  assert compile_cache.requested_dir(value) is None


def test_default_dir_is_the_user_cache_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  for value in ("", "1", "true"):
    assert compile_cache.requested_dir(value) == str(tmp_path / "overinterp_jax" / "jax")
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert compile_cache.requested_dir("").startswith(os.path.expanduser("~"))
  assert compile_cache.requested_dir(str(tmp_path / "c")) == str(tmp_path / "c")


def test_on_by_default_with_a_short_minimum_compile_time(restored, tmp_path):
  restored.setenv(compile_cache.ENV, str(tmp_path / "cache"))
  jax.config.update("jax_compilation_cache_dir", None)
  compile_cache._chosen = compile_cache._ours = None
  assert compile_cache.use_persistent_cache() == str(tmp_path / "cache")
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
  assert (jax.config.jax_persistent_cache_min_compile_time_secs
          == compile_cache.MIN_COMPILE_SECONDS)


def test_a_directory_the_user_set_is_never_overridden(restored, tmp_path):
  restored.setenv(compile_cache.ENV, str(tmp_path / "ours"))
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "users"))
  compile_cache._chosen = compile_cache._ours = None
  for enabled in (None, True, False):
    assert compile_cache.use_persistent_cache(enabled) == str(tmp_path / "users")
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "users")
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 1.0


def test_config_false_turns_it_off_for_good_and_the_environment_opt_out_wins(restored,
                                                                             tmp_path):
  restored.setenv(compile_cache.ENV, str(tmp_path / "cache"))
  jax.config.update("jax_compilation_cache_dir", None)
  compile_cache._chosen = compile_cache._ours = None
  assert compile_cache.use_persistent_cache(True) == str(tmp_path / "cache")
  assert compile_cache.use_persistent_cache(False) is None  # config.runtime.compilation_cache
  assert compile_cache.use_persistent_cache() is None  # a later library call keeps it off
  assert jax.config.jax_compilation_cache_dir is None
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 1.0
  restored.setenv(compile_cache.ENV, "0")
  assert compile_cache.use_persistent_cache(True) is None


_FIND_SIS = """
import json, time, numpy as np, jax.numpy as jnp
from overinterp_jax import sis
w = np.linspace(0.5, 1.5, 12, dtype=np.float32)
start = time.perf_counter()
r = sis.find_sis(lambda b: (b * w).sum(-1), 4.0, np.ones(12, np.float32), np.ones(12, bool),
                 np.zeros(12, np.float32))
print(json.dumps(dict(order=r.ordering_over_entire_backselect.tolist(),
                      values=r.values_over_entire_backselect.tolist(),
                      seconds=time.perf_counter() - start)))
"""


@pytest.mark.slow
def test_a_fresh_process_loads_the_program_and_gets_the_same_result(tmp_path):
  """Two fresh processes (~5 s each): the first fills the cache, the second reads it."""
  env = dict(os.environ, **{compile_cache.ENV: str(tmp_path / "cache")})
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  runs = []
  for _ in range(2):
    proc = subprocess.run([sys.executable, "-c", _FIND_SIS], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert os.listdir(tmp_path / "cache")  # the selection program was written
  assert runs[0]["order"] == runs[1]["order"] and runs[0]["values"] == runs[1]["values"]


def test_config_key_defaults_on_and_is_checked():
  from overinterp_jax import config_checks
  from overinterp_jax.config_schema import base_config
  c = base_config()
  assert c.runtime.compilation_cache is True
  config_checks.validate_config(c, num_devices=1)
  with c.runtime.ignore_type():
    c.runtime.compilation_cache = "no"
  with pytest.raises(ValueError, match=r"config\.runtime\.compilation_cache"):
    config_checks.validate_config(c, num_devices=1)
