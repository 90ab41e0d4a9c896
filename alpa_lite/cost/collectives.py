"""Alpha-beta time of collectives on the axes of a `LogicalMesh`.

For a per-device buffer of B bytes on a group of n devices (nccl-tests bus-bandwidth factors):

    all-reduce      alpha + beta * 2(n-1)/n * B
    all-gather      alpha + beta * (n-1)/n * B      (B = gathered bytes per device)
    reduce-scatter  alpha + beta * (n-1)/n * B      (B = bytes per device before scattering)
    all-to-all      alpha + beta * (n-1)/n^2 * B * n/2   (Alpa's penalty factor n/2)
    send/recv       alpha + beta * B

Like Alpa we add small tie-breakers (all-reduce +0.01, all-gather +0.1, reduce-scatter +0.001,
scaled by alpha) so that among equal plans the planner prefers all-reduce-based ones.

When the mesh carries a measured `ProfileDatabase` (``mesh.profile``) with rows for the link
class of the axes (``mesh.link_class(axes)``), the time is interpolated from the measurements
instead (`ProfileDatabase.collective_time_s`; no n/2 all-to-all penalty, since the measured
time is the real one), plus the same tie-breakers.
"""

from __future__ import annotations

import enum
from typing import Sequence

from alpa_lite.mesh import LogicalMesh


class Collective(enum.Enum):
    ALL_REDUCE = "all-reduce"
    ALL_GATHER = "all-gather"
    REDUCE_SCATTER = "reduce-scatter"
    ALL_TO_ALL = "all-to-all"


_TIE_BREAK = {
    Collective.ALL_REDUCE: 0.01,
    Collective.ALL_GATHER: 0.1,
    Collective.REDUCE_SCATTER: 0.001,
    Collective.ALL_TO_ALL: 0.0,
}


def estimate_collective_s(
    kind: Collective, mesh: LogicalMesh, axes: Sequence[str], num_bytes: float
) -> float:
    """Seconds for one collective of ``num_bytes`` (per device) over ``axes`` of ``mesh``.

    Example:
        >>> mesh = LogicalMesh(shape=(4,), alpha_s=(1.0,), beta_s_per_byte=(1.0,))
        >>> estimate_collective_s(Collective.ALL_REDUCE, mesh, ("x",), 100.0)
        151.01
    """
    n = mesh.axes_size(axes)
    if n <= 1:
        return 0.0
    alpha, beta = mesh.link(axes)
    if mesh.profile is not None and mesh.profile.has_link(link := mesh.link_class(axes)):
        measured_s = mesh.profile.collective_time_s(kind.value, n, num_bytes, link)
        return measured_s + alpha * _TIE_BREAK[kind]
    if kind is Collective.ALL_REDUCE:
        factor = 2.0 * (n - 1) / n
    elif kind is Collective.ALL_TO_ALL:
        factor = (n - 1) / n / n * (n / 2.0)
    else:
        factor = (n - 1) / n
    return alpha + beta * factor * num_bytes + alpha * _TIE_BREAK[kind]


def estimate_send_recv_s(alpha_s: float, beta_s_per_byte: float, num_bytes: float) -> float:
    """Seconds to send ``num_bytes`` point to point over one link."""
    return alpha_s + beta_s_per_byte * num_bytes
