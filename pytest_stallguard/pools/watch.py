"""PoolWatch: arms every library watcher while a guard runs and answers the leak check.

Findings: ``threadpool-saturation`` (a request waited longer than the threshold for a
worker thread of anyio's limiter or asyncio's default executor), ``pool-exhaustion`` (for
a SQLAlchemy, httpx or asyncpg slot: a pool timeout, requests queued behind a connection
held idle, or a wait over ``pool_wait_ms``, over a built-in bound when it is not set),
``client-per-request`` (an httpx client, SQLAlchemy engine or asyncpg pool created while
serving a request). The library modules do the watching.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

from .. import guard
from ..location import Location
from ..model import PoolStats
from .asyncpg import AsyncpgWatch
from .common import CheckedOut, ThreadCall, WatchCore
from .executor import ExecutorWatch
from .httpx import HttpxWatch, StuckPool, stuck_pools
from .sqlalchemy import SqlalchemyWatch
from .threads import ThreadWatch

__all__ = ["PoolWatch"]


class PoolWatch(WatchCore):
    """Watch every pool while armed. Sync ``start()``/``stop()``, callable in or out of
    the loop; ``stop()`` is idempotent and restores every patch.

    ``guard_`` defaults to :func:`guard.active` at the time of each finding. SQLAlchemy
    and asyncpg are watched from ``start()`` if the app imported them, else from the moment
    it imports them (:meth:`patching.Patches.when_imported`), until ``stop()``.
    ``threshold_ms`` bounds waits (the guard's threshold when None). Plain waits for a DB
    or HTTP slot use it only when it is the user's word on them (``wait_set``; by default,
    when ``threshold_ms`` is given), else the built-in ``DEFAULT_SLOT_WAIT_MS``, as the
    plugin does when ``pool_wait_ms`` is not set.
    """

    def __init__(self, guard_: guard.Guard | None = None, *, threshold_ms: float | None = None,
                 wait_set: bool | None = None) -> None:
        if wait_set is None:
            wait_set = threshold_ms is not None
        super().__init__(guard_, threshold_ms=threshold_ms, wait_set=wait_set)
        self._threads = ThreadWatch(self)
        self._executor = ExecutorWatch(self)
        self._httpx = HttpxWatch(self)
        self._sqlalchemy: SqlalchemyWatch | None = None
        self._asyncpg: AsyncpgWatch | None = None

    # -- arming ------------------------------------------------------------------------
    def start(self) -> PoolWatch:
        if self.on:
            return self
        self.on = True
        self._install("anyio", self._threads.install)
        self._install("asyncio", self._executor.install)
        self._install("httpx", self._httpx.install)
        # SQLAlchemy and asyncpg are never imported by us: watched now if the app imported
        # them, else as soon as it does (a fixture importing the app lazily), in any thread.
        self._sqlalchemy = self._asyncpg = None
        self.patches.when_imported("sqlalchemy", self._watch_sqlalchemy)
        self.patches.when_imported("asyncpg", self._watch_asyncpg)
        return self

    def _watch_sqlalchemy(self, module: ModuleType) -> None:
        if not self.on:
            return
        if self._sqlalchemy is None:
            self._sqlalchemy = SqlalchemyWatch(self)
        self._install("sqlalchemy", self._sqlalchemy.install)

    def _watch_asyncpg(self, module: ModuleType) -> None:
        if not self.on:
            return
        if self._asyncpg is None:
            self._asyncpg = AsyncpgWatch(self)
        self._install("asyncpg", self._asyncpg.install)

    def _install(self, library: str, install: Callable[[], None]) -> None:
        """A library version whose internals moved is not watched; the rest is."""
        try:
            install()
        except Exception as exc:
            self.hooks.failed(library, f"{library} pools (install)", exc)

    def stop(self) -> None:
        self.on = False
        self.patches.restore()
        self.close_run_queues()

    def __enter__(self) -> PoolWatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> list[PoolStats]:
        return self.all_stats()

    # -- what the leak check reads -----------------------------------------------------
    @property
    def thread_calls(self) -> list[ThreadCall]:
        return self._threads.calls

    @property
    def transports(self) -> weakref.WeakSet[Any]:
        return self._httpx.transports

    def busy_threads(self) -> list[ThreadCall]:
        """Worker-thread calls for a request that have not finished."""
        return self._threads.busy()

    def checked_out(self) -> list[CheckedOut]:
        """SQLAlchemy and asyncpg connections checked out and not returned yet."""
        out: list[CheckedOut] = []
        if self._sqlalchemy is not None:
            out.extend(self._sqlalchemy.checked_out())
        if self._asyncpg is not None:
            out.extend(self._asyncpg.checked_out())
        return out

    def stuck_http(self, clients: Iterable[Any] = ()) -> list[StuckPool]:
        """httpx pools (used while armed, or of ``clients``) holding stuck connections."""
        return stuck_pools(list(self._httpx.transports), clients)

    def transport_user(self, transport: Any) -> Location | None:
        """The last user line that sent a request through ``transport``."""
        return self._httpx.transport_user(transport)
