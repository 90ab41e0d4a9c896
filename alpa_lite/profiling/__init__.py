"""Cluster profiling: measured collective, matmul, launch and memory timings, and their database.

`ProfileDatabase` (JSON, hashable) is what the cost model reads; `profile_collectives` and
`profile_matmul` measure it on live devices. The profilers import jax, so they load on first
use: importing this package (e.g. from `alpa_lite.cli` before ``--devices`` sets XLA_FLAGS)
touches no backend.
"""

from alpa_lite.profiling.database import COLLECTIVE_KINDS as COLLECTIVE_KINDS
from alpa_lite.profiling.database import CollectiveRow as CollectiveRow
from alpa_lite.profiling.database import LaunchRow as LaunchRow
from alpa_lite.profiling.database import MatmulRow as MatmulRow
from alpa_lite.profiling.database import MemoryBandwidthRow as MemoryBandwidthRow
from alpa_lite.profiling.database import ProfileDatabase as ProfileDatabase
from alpa_lite.profiling.database import bus_bandwidth_factor as bus_bandwidth_factor

_LAZY = {
    "profile_collectives": "alpa_lite.profiling.comm",
    "format_collective_table": "alpa_lite.profiling.comm",
    "profile_matmul": "alpa_lite.profiling.compute",
    "format_matmul_table": "alpa_lite.profiling.compute",
    "profile_launch_latency": "alpa_lite.profiling.compute",
    "profile_memory_bandwidth": "alpa_lite.profiling.compute",
    "format_launch_and_memory": "alpa_lite.profiling.compute",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'alpa_lite.profiling' has no attribute {name!r}")
