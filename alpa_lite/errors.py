"""The alpa_lite error hierarchy.

Every user-facing message says what was expected, what was got (with values) and how to fix it.
"""

from __future__ import annotations


class AlpaLiteError(Exception):
    """Base class of every error alpa_lite raises on purpose."""


class InvalidConfigError(AlpaLiteError, ValueError):
    """A method option, mesh, cluster or argument is invalid."""


class UnsupportedPrimitiveError(AlpaLiteError, NotImplementedError):
    """A primitive has no sharding rule and strict mode forbids the replicated fallback."""


class InfeasiblePlanError(AlpaLiteError):
    """No plan fits the memory budget.

    Attributes:
        budget_bytes: the per-device memory budget that was asked for.
        min_bytes: the smallest peak per-device memory any plan reaches (or a lower bound on it).
    """

    def __init__(self, message: str, *, budget_bytes: float, min_bytes: float):
        super().__init__(message)
        self.budget_bytes = budget_bytes
        self.min_bytes = min_bytes
