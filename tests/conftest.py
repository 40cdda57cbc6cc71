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
