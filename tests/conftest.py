"""Test configuration: 8 forced CPU devices (set before jax is imported) so that the
multi-device tests (sharding, data-parallel) run on this CPU-only machine."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run one test in float64 without touching the global config of other tests."""
    import jax

    with jax.enable_x64(True):
        yield
