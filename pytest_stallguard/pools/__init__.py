"""Shrink pools for a test, and watch every pool while a guard runs.

Production stalls when a pool runs dry: FastAPI's worker-thread limiter, a SQLAlchemy
pool, an httpx client's connection pool, an asyncpg pool. :class:`ShrinkPools` makes them
small for one test; :class:`PoolWatch` times every wait for a slot and reports long ones.
One module per library owns its watching, shrinking and leak inspection (``threads``,
``sqlalchemy``, ``httpx``, ``asyncpg``); ``common`` holds what they share.
"""

from __future__ import annotations

from .common import POOL_KINDS, CheckedOut, ThreadCall
from .httpx import note_http_pool_wait, stuck_connections
from .shrink import ShrinkPools
from .watch import PoolWatch

__all__ = [
    "POOL_KINDS",
    "CheckedOut",
    "PoolWatch",
    "ShrinkPools",
    "ThreadCall",
    "note_http_pool_wait",
    "stuck_connections",
]
