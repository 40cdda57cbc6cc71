"""Test configuration: four simulated CPU devices, so sharded code paths run everywhere."""
import os

# Tests neither read nor fill a user's persistent compilation cache (overinterp_jax/
# compile_cache.py); subprocesses inherit this. Tests of the cache set their own.
os.environ["OVERINTERP_JAX_COMPILATION_CACHE"] = "0"

import jax  # noqa: E402
import pytest

from smoke_pipeline import run_main

# Must happen before any JAX operation creates the CPU backend.
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_platforms", "cpu")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long tests (real data, real models); -m 'not slow' skips them")


@pytest.fixture(scope="session")
def devices():
  devs = jax.devices()
  assert len(devs) == 4, f"expected 4 simulated CPU devices, got {devs}"
  return devs


@pytest.fixture(scope="module")
def fast_compile():
  """Tiny models on CPU: compile time dominates, so skip most XLA optimisations.

  Modules opt in with ``pytestmark = pytest.mark.usefixtures("fast_compile")``;
  the setting is restored, and the compilation caches cleared, after the module,
  so executables compiled without optimisations never reach other tests.
  """
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)
  jax.clear_caches()


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
  """One uninterrupted smoke run of every stage: ``(workdir, completed process)``. Tests
  that damage its files work on a copy."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  proc = run_main(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


@pytest.fixture(scope="session")
def finished(finished_run):
  """The work directory of ``finished_run``."""
  return finished_run[0]
