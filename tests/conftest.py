"""Test configuration: 8 simulated CPU devices.

Strict dtype promotion is not switched on: optax's own code (Adam's bias correction) mixes
Python floats with int32 counters and fails under it.

jax reads XLA_FLAGS when its backend starts, so the flag is set here, before any test imports
jax's backend. ``jax_num_cpu_devices`` is set too for jax versions that prefer it.
"""

import os

# XLA's backend (code generation) optimisation level 0: the suite's programs are small and
# compiled once or twice each, so compiling them faster outweighs running them slower (the
# jax 0.10 suite in 389 s against 488 s, one after the other on one machine). Serial and
# parallel programs are compiled alike, and the tests that read compiled HLO (kernel counts,
# collectives, no involuntary remat) pass as at the default level. Benchmarks, examples and
# users get XLA's defaults; XLA_FLAGS set outside replaces this.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

# XLA's persistent compilation cache, shared by the xdist workers of a run and kept between
# runs (jax keys each entry by the program, the compile options and the jax version, so a hit
# is the executable a compile would give). Tests compile the same serial and parallel programs
# many times over; on a fresh clone this saves about a tenth of the suite's time. (It grows
# by about 25 MB a run of changed code: `make clean` or deleting .pytest_cache empties it.)
_CACHE_DIR = os.environ.get("ALPA_LITE_TEST_COMPILE_CACHE", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
    "jax-compilation-cache"))
if _CACHE_DIR:  # ALPA_LITE_TEST_COMPILE_CACHE="" switches it off
    jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "cpu":
        skip_gpu = pytest.mark.skip(reason="needs a GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)
