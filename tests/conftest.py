"""Test configuration: 8 simulated CPU devices.

Strict dtype promotion is not switched on: optax's own code (Adam's bias correction) mixes
Python floats with int32 counters and fails under it.

jax reads XLA_FLAGS when its backend starts, so the flag is set here, before any test imports
jax's backend. ``jax_num_cpu_devices`` is set too for jax versions that prefer it.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "cpu":
        skip_gpu = pytest.mark.skip(reason="needs a GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
