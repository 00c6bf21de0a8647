"""Fault injection for the crash tests: ``ATTNSTORE_CRASH_AT="commit:heads:3"`` kills this process
(SIGKILL, no clean-up) the 3rd time a flush reaches that point.

Points, in flush order (:data:`FAULT_POINTS`): ``segment`` (a segment written), ``table:<name>`` (a
Parquet part written), ``intent`` (the intent recorded), ``commit:<name>`` (a Delta commit done;
``docs`` last), ``committed``. Writers call :func:`fault` through this module (``faults.fault``), so
a test can replace it in one place.
"""

from __future__ import annotations

import os
import signal
from typing import Final

__all__ = ["FAULT_POINTS", "fault"]

FAULT_POINTS: Final = (
    "segment",
    "table:docs",
    "table:tokens",
    "table:heads",
    "intent",
    "commit:tokens",
    "commit:heads",
    "commit:docs",
    "committed",
)
_counts: dict[str, int] = {}


def fault(point: str) -> None:
    """Kill this process here if ``ATTNSTORE_CRASH_AT`` names ``point`` and this is its n-th time."""
    spec = os.environ.get("ATTNSTORE_CRASH_AT")
    if not spec:
        return
    where, _, nth = spec.rpartition(":")
    if where != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(nth):
        os.kill(os.getpid(), signal.SIGKILL)
