"""pytest-stallguard: catch what makes async web apps stall under load."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .errors import BlockingCallError, StallFindings, StallguardError
from .model import BurstResult, CanaryResult, Finding, PoolStats, RequestTiming

try:
    __version__ = version("pytest-stallguard")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "BlockingCallError",
    "BurstResult",
    "CanaryResult",
    "Finding",
    "PoolStats",
    "RequestTiming",
    "StallFindings",
    "StallguardError",
    "__version__",
]
