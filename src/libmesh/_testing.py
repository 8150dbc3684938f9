"""A switch for users' test suites: make libmesh's waiting instant.

    import libmesh
    libmesh.set_testing(True)   # retry back-off and injected delays no longer sleep

Decisions are unchanged (a delay fault is still counted as injected); only the waiting goes.
"""

from __future__ import annotations

import asyncio
import time

__all__ = ["asleep", "is_testing", "set_testing", "sleep"]

_testing = False


def set_testing(testing: bool) -> None:
    """Turn instant waiting on or off, process-wide."""
    global _testing
    _testing = testing


def is_testing() -> bool:
    return _testing


def sleep(seconds: float) -> None:
    """Wait, unless testing."""
    if seconds > 0 and not _testing:
        time.sleep(seconds)


async def asleep(seconds: float) -> None:
    """Wait without blocking the event loop, unless testing."""
    if seconds > 0 and not _testing:
        await asyncio.sleep(seconds)
