"""The one module that knows how PuLP's API differs between its major versions.

PuLP 3 (what Python 3.11 resolves with our pins' lower bounds) and PuLP 4 (a Rust core, what
pip resolves on Python >= 3.12 today) build expressions and report a solve differently:

- an affine expression from ``(variable, coefficient)`` pairs: ``LpAffineExpression(pairs)``
  in PuLP 3, ``LpAffineExpression.from_list(pairs)`` in PuLP 4 (whose constructor takes the
  Rust expression only). ``pulp.lpSum`` is no substitute: it reads a pair as a sum of two
  terms in both versions.
- a solve's outcome: ``problem.status`` / ``problem.sol_status`` in PuLP 3; PuLP 4's
  ``solve`` returns an ``LpSolveStats`` with ``status`` and ``has_solution``.
- PuLP 4 no longer bundles CBC (``PULP_CBC_CMD``).

numpy + pulp only, like the solver that uses it (no jax).
"""

from __future__ import annotations

import warnings

import pulp

_HAS_FROM_LIST = hasattr(pulp.LpAffineExpression, "from_list")


def affine(pairs) -> pulp.LpAffineExpression:
    """The expression sum(coefficient * variable) over ``(variable, coefficient)`` pairs."""
    pairs = list(pairs)
    if _HAS_FROM_LIST:
        return pulp.LpAffineExpression.from_list(pairs)
    return pulp.LpAffineExpression(pairs)


def bundled_cbc(time_limit_s: float):
    """PuLP's bundled CBC, or None where this PuLP no longer ships one (PuLP >= 4)."""
    if not hasattr(pulp, "PULP_CBC_CMD"):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        cbc = pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit_s)
    return cbc if cbc.available() else None


def solve(model: pulp.LpProblem, backend) -> str:
    """Solves ``model``; returns ``"optimal"``, ``"infeasible"`` (proven to have no solution)
    or ``"time_limit"`` (stopped early: the variables hold a solution or none)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        result = model.solve(backend)
    stats_status = getattr(result, "status", None)
    if stats_status is not None:  # PuLP >= 4: an LpSolveStats
        if stats_status == pulp.LpSolveStatus.Optimal and result.has_solution:
            return "optimal"
        if stats_status == pulp.LpSolveStatus.Infeasible:
            return "infeasible"
        return "time_limit"
    if model.status == pulp.LpStatusInfeasible:
        return "infeasible"
    # PuLP 3 reports "Optimal" for CBC runs cut by the time limit; sol_status tells them apart.
    return "optimal" if model.sol_status == pulp.LpSolutionOptimal else "time_limit"
