"""ShrinkPools: make pools small for one test, then put them back.

In a test with one request at a time no pool is ever short; a small pool shows what
production sees under load. Each library module knows how to shrink its own pools; this
class keeps the steps that undo them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import httpx as _httpx

from .. import patching
from . import asyncpg as asyncpg_pools
from . import httpx as httpx_pools
from . import sqlalchemy as sqlalchemy_pools
from .common import POOL_KINDS, HookGuard, check_size
from .threads import ThreadShrink

__all__ = ["ShrinkPools"]


class ShrinkPools:
    """Make pools small for one test; restore them with :meth:`aclose` (or :meth:`close`).

    Construct anywhere. ``threads`` needs the loop: called inside it, it applies at once;
    called outside, it applies at the first ``to_thread.run_sync`` of any loop.
    ``aclose()`` must run in the loop for SQLAlchemy async engines (the temporary pool is
    disposed with ``greenlet_spawn``); ``close()`` restores everything from sync code and
    disposes only sync pools.
    """

    def __init__(self) -> None:
        self._patches = patching.Patches("shrink pools")
        self._hooks = HookGuard("shrink pools")
        self._undo: list[Callable[[], Any]] = []  # sync restore steps, LIFO
        self._async_disposals: list[Any] = []  # temporary async pools to dispose
        self._threads = ThreadShrink(self._patches, self._hooks)
        self._asyncpg: asyncpg_pools.AsyncpgShrink | None = None
        self._applied: dict[str, Any] = {}
        self._closed = False

    def _is_closed(self) -> bool:
        return self._closed

    def threads(self, n: int) -> None:
        """Set the worker-thread limiter of the running loop (or of the next one) to ``n``."""
        self._threads.threads(n)

    def sqlalchemy(self, engine: Any, size: int = 2, overflow: int = 0, timeout: float = 0.5
                   ) -> Any:
        """Swap the pool of ``engine`` (``Engine`` or ``AsyncEngine``) for a small one.

        Returns the temporary pool. Only QueuePool-style pools can be shrunk.
        """
        return sqlalchemy_pools.shrink_engine(
            engine, size, overflow, timeout, self._undo, self._async_disposals
        )

    def httpx(self, client: _httpx.AsyncClient | _httpx.Client, max_connections: int = 2,
              pool_timeout: float = 0.5) -> None:
        """Limit the client's connection pools to ``max_connections`` and its pool timeout
        to ``pool_timeout`` (httpcore pool private attributes, httpcore 1.0)."""
        httpx_pools.shrink_client(client, max_connections, pool_timeout, self._undo)

    async def asyncpg(self, pool: Any, size: int = 2, timeout: float = 0.5) -> None:
        """Let at most ``size`` connections of an initialised asyncpg pool be acquired at
        once, and give ``acquire()`` a default ``timeout`` (asyncpg has none).

        Works by taking spare connection holders out of the pool's queue (private
        ``_queue``) until the test ends; it waits (bounded by ``timeout``) for holders in
        use to come back. Holders are put back at close.
        """
        if self._asyncpg is None:
            self._asyncpg = asyncpg_pools.AsyncpgShrink(self._patches, self._hooks)
        await self._asyncpg.shrink(pool, size, timeout, self._undo)

    # -- zero-config -------------------------------------------------------------------
    def apply(self, spec: dict[str, Any]) -> None:
        """Apply ``pools={"threads": 2, "sqlalchemy": 2, "httpx": 2, "asyncpg": 2}`` to
        every limiter, engine, client and asyncpg pool created from now on."""
        if not isinstance(spec, dict):
            raise ValueError(
                f"pools={spec!r} is not valid; give a dict such as "
                '{"threads": 2, "sqlalchemy": 2, "httpx": 2}'
            )
        for key, value in spec.items():
            if key not in POOL_KINDS:
                raise ValueError(
                    f"pools: unknown pool {key!r}; valid ones: {', '.join(POOL_KINDS)}"
                )
            check_size(f'pools["{key}"]', value)
        self._applied = dict(spec)
        if "threads" in spec:
            self.threads(spec["threads"])
        if "httpx" in spec:
            httpx_pools.shrink_new_pools(self._patches, self._hooks, spec["httpx"],
                                         self._is_closed)
        if "sqlalchemy" in spec:
            sqlalchemy_pools.shrink_new_pools(self._patches, self._hooks, spec["sqlalchemy"],
                                        self._is_closed)
        if "asyncpg" in spec:
            asyncpg_pools.shrink_new_pools(self._patches, self._hooks, spec["asyncpg"],
                                     self._is_closed)

    # -- restoring ---------------------------------------------------------------------
    def close(self) -> None:
        """Restore everything (sync); idempotent. Errors are raised after every step ran."""
        self._closed = True
        errors: list[BaseException] = []
        self._patches.restore()
        while self._undo:
            try:
                self._undo.pop()()
            except BaseException as exc:
                errors.append(exc)
        self._threads.restore(errors)
        if self._asyncpg is not None:
            self._asyncpg.restore()
        if errors:
            raise errors[0]

    async def aclose(self) -> None:
        """Restore everything and dispose temporary async pools; run it inside the loop."""
        try:
            self.close()
        finally:
            disposals, self._async_disposals = self._async_disposals, []
            if disposals:
                from sqlalchemy.util import greenlet_spawn

                for pool in disposals:
                    with anyio.move_on_after(5.0):
                        await greenlet_spawn(pool.dispose)

    def __enter__(self) -> ShrinkPools:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> ShrinkPools:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()



