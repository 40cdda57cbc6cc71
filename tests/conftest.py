"""Test configuration: four simulated CPU devices, so sharded code paths run everywhere."""
import jax
import pytest

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
