"""asyncpg: watch ``Pool._acquire`` waits and checkouts, shrink a pool.

Watch: the private ``Pool._acquire(timeout)`` (waits, timeouts, who holds which
connection holder) and ``Pool.__init__`` (a pool made during a request). Holders are kept
by id with a strong reference until they are seen released: before asyncpg 0.32
``PoolConnectionHolder`` has ``__slots__`` without ``__weakref__``. Shrink: take spare
holders out of the pool's private ``_queue`` and give ``acquire()`` a default timeout, or
make every pool created from now on small.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from .. import audit, patching
from ..clock import real
from .common import (
    CheckedOut,
    Held,
    HookGuard,
    Stats,
    WatchCore,
    armed_by,
    caller_location,
    check_size,
    check_timeout,
    request_info,
    same_signature,
)

__all__ = ["AsyncpgShrink", "AsyncpgWatch", "shrink_new_pools"]

LIBRARY = "asyncpg"
ACQUIRE = "asyncpg Pool._acquire"
RELEASE = "asyncpg Pool.release"
QUERY = "asyncpg connection queries"
# The Connection methods that run a query (a pool's proxy looks them up at call time).
QUERY_METHODS = (
    "execute", "executemany", "fetch", "fetchval", "fetchrow", "fetchmany", "prepare",
    "copy_from_table", "copy_from_query", "copy_to_table", "copy_records_to_table",
)


class _Acquire:
    __slots__ = ("frame", "preempted", "started", "stats", "token")

    def __init__(self, stats: Stats, frame: FrameType, core: WatchCore) -> None:
        self.stats = stats
        self.frame = frame
        self.started = real.perf_counter()
        self.token = core.wait_begin(stats, self.started)
        self.preempted = 0.0

    def wait_ms(self) -> float:
        return (real.perf_counter() - self.started) * 1000.0


class AsyncpgWatch:
    """Pool waits and checked-out connections of asyncpg (part of :class:`PoolWatch`)."""

    def __init__(self, core: WatchCore) -> None:
        self.core = core
        # id(holder) -> (holder, where): holders of asyncpg < 0.32 cannot be weak-referenced
        self._out: dict[int, tuple[Any, CheckedOut]] = {}
        # id(connection) -> its checkout, while a watched acquire holds it
        self._held: dict[int, Held] = {}

    def install(self) -> None:
        import asyncpg.connection  # type: ignore[import-untyped]
        import asyncpg.pool  # type: ignore[import-untyped]

        core, hooks, watch = self.core, self.core.hooks, self
        link = core.patches.link(asyncpg.pool.Pool, "_acquire")

        @functools.wraps(link.next)
        async def _acquire(*args: Any, **kwargs: Any) -> Any:
            pool = args[0] if args else None
            if not core.on or hooks.disabled(ACQUIRE, pool):
                return await link.next(*args, **kwargs)
            began: _Acquire | None = hooks.safely(
                LIBRARY, ACQUIRE, pool, watch._begin, pool, sys._getframe(1)
            )
            if began is None:
                return await link.next(*args, **kwargs)
            try:
                proxy = await link.next(*args, **kwargs)
            except BaseException as exc:
                hooks.safely(LIBRARY, ACQUIRE, pool, watch._wait_over, began)
                hooks.safely(LIBRARY, ACQUIRE, pool, watch._failed, began, exc)
                raise
            hooks.safely(LIBRARY, ACQUIRE, pool, watch._wait_over, began)
            if not hooks.disabled(ACQUIRE, pool):  # half a wait's bookkeeping judges nothing
                hooks.safely(LIBRARY, ACQUIRE, pool, watch._acquired, pool, began, proxy)
            return proxy

        core.patches.set(asyncpg.pool.Pool, "_acquire", _acquire, link)
        core.watch_init(asyncpg.pool.Pool, LIBRARY, "asyncpg pool")

        release_link = core.patches.link(asyncpg.pool.Pool, "release")

        @functools.wraps(release_link.next)
        async def release(*args: Any, **kwargs: Any) -> Any:
            if watch._held and not hooks.disabled(RELEASE):
                hooks.safely(LIBRARY, RELEASE, None, watch._released, args, kwargs,
                             sys._getframe(1))
            return await release_link.next(*args, **kwargs)

        core.patches.set(asyncpg.pool.Pool, "release", release, release_link)
        for name in QUERY_METHODS:
            if callable(getattr(asyncpg.connection.Connection, name, None)):
                self._watch_query(asyncpg.connection.Connection, name)

    def _watch_query(self, cls: type, name: str) -> None:
        """Time ``cls.name`` (a coroutine) as work on the connection it runs on."""
        core, hooks, held_by = self.core, self.core.hooks, self._held
        link = core.patches.link(cls, name)

        @functools.wraps(link.next)
        async def query(*args: Any, **kwargs: Any) -> Any:
            held = held_by.get(id(args[0])) if args and held_by else None
            if held is None or hooks.disabled(QUERY):
                return await link.next(*args, **kwargs)
            hooks.safely(LIBRARY, QUERY, None, core.work_begin, held, sys._getframe(1))
            try:
                return await link.next(*args, **kwargs)
            finally:
                hooks.safely(LIBRARY, QUERY, None, core.work_end, held)

        core.patches.set(cls, name, query, link)

    def checked_out(self) -> list[CheckedOut]:
        """Connections acquired and not released yet (released holders are dropped)."""
        with self.core.lock:
            out = []
            for key, (holder, record) in list(self._out.items()):
                if getattr(holder, "_in_use", None) is None:
                    del self._out[key]
                else:
                    out.append(record)
            return out

    def clear(self) -> None:
        with self.core.lock:
            self._out.clear()
            self._held.clear()

    # -- bookkeeping (each step runs under HookGuard.safely) ----------------------------
    def _begin(self, pool: Any, frame: FrameType) -> _Acquire:
        stats = self.core.stat(pool, "asyncpg pool", "asyncpg")
        stats.size = int(getattr(pool, "_maxsize", 0))
        return _Acquire(stats, frame, self.core)

    def _wait_over(self, began: _Acquire) -> None:
        began.preempted = self.core.wait_end(began.stats, began.token, began.wait_ms())

    def _failed(self, began: _Acquire, exc: BaseException) -> None:
        if not isinstance(exc, asyncio.TimeoutError):
            return
        wait_ms = began.wait_ms()
        audit.span("pool_wait", began.started, real.perf_counter())  # issue 10
        with self.core.lock:
            began.stats.timeouts += 1
            began.stats.waits_ms.append(wait_ms)
        self.core.pool_wait(began.stats, wait_ms, began.frame, timed_out=True)

    def _acquired(self, pool: Any, began: _Acquire, proxy: Any) -> None:
        core, stats = self.core, began.stats
        wait_ms = began.wait_ms()
        audit.span("pool_wait", began.started, real.perf_counter())  # issue 10
        info = request_info()
        holder = getattr(proxy, "_holder", None)
        location = caller_location(began.frame) if holder is not None else None
        connection = getattr(holder, "_con", None)
        if connection is not None and location is not None:
            held = core.checkout(stats, info, location)
            with core.lock:
                self._held[id(connection)] = held
        with core.lock:
            stats.waits_ms.append(wait_ms)
            holders = getattr(pool, "_holders", ())
            in_use = sum(1 for h in holders if getattr(h, "_in_use", None) is not None)
            stats.max_in_use = max(stats.max_in_use, in_use)
            if holder is not None and location is not None:
                self._out[id(holder)] = (holder, CheckedOut(
                    pool=stats.name, request=None if info is None else info.request,
                    location=location, since=real.perf_counter(), by_request=armed_by(info),
                ))
        core.plain_wait(stats, wait_ms, began.preempted, began.frame, began.started)

    def _released(self, args: tuple[Any, ...], kwargs: dict[str, Any], frame: FrameType
                  ) -> None:
        proxy = args[1] if len(args) > 1 else kwargs.get("connection")
        connection = getattr(proxy, "_con", None)
        if connection is None:
            return
        with self.core.lock:
            held = self._held.pop(id(connection), None)
        if held is not None:
            self.core.checkin(held, frame)


# -- shrinking ----------------------------------------------------------------------------


class AsyncpgShrink:
    """Shrinks initialised pools (held-back holders, default acquire timeout)."""

    def __init__(self, patches: patching.Patches, hooks: HookGuard) -> None:
        self._patches = patches
        self._hooks = hooks
        self._timeouts: dict[int, tuple[Any, float]] = {}  # id(pool) -> (pool, timeout)
        self._patched = False

    async def shrink(self, pool: Any, size: int, timeout: float,
                     undo: list[Callable[[], None]]) -> None:
        size = check_size("size", size)
        timeout = check_timeout("timeout", timeout)
        queue = getattr(pool, "_queue", None)
        maxsize = getattr(pool, "_maxsize", None)
        if queue is None or not isinstance(maxsize, int):
            raise TypeError(
                f"shrink_pools.asyncpg: {pool!r} is not an initialised asyncpg pool "
                "(await asyncpg.create_pool(...) first)"
            )
        held: list[Any] = []
        timeouts = self._timeouts

        def restore() -> None:
            while held:
                queue.put_nowait(held.pop())
            timeouts.pop(id(pool), None)

        undo.append(restore)
        # asyncpg 0.30+ queues prefer disconnected holders; older ones are a LifoQueue.
        take = getattr(queue, "get_disconnected_nowait", queue.get_nowait)
        for _ in range(max(maxsize - size, 0)):
            try:
                held.append(take())
            except asyncio.QueueEmpty:
                held.append(await asyncio.wait_for(queue.get(), timeout))
        timeouts[id(pool)] = (pool, timeout)
        self._patch_acquire()

    def _with_default(self, args: tuple[Any, ...], kwargs: dict[str, Any]
                      ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        pool = args[0]
        entry = self._timeouts.get(id(pool))
        if entry is None or entry[0] is not pool:
            return args, kwargs
        if len(args) > 1 and args[1] is None:
            return (pool, entry[1], *args[2:]), kwargs
        if len(args) == 1 and kwargs.get("timeout", 0) is None:
            return args, {**kwargs, "timeout": entry[1]}
        return args, kwargs

    def _patch_acquire(self) -> None:
        if self._patched:
            return
        self._patched = True
        import asyncpg.pool

        link = self._patches.link(asyncpg.pool.Pool, "_acquire")
        hooks, what = self._hooks, "asyncpg acquire timeout (shrink)"
        shrink = self

        @functools.wraps(link.next)
        async def _acquire(*args: Any, **kwargs: Any) -> Any:
            if args and not hooks.disabled(what):
                given = hooks.safely(LIBRARY, what, None, shrink._with_default, args, kwargs)
                if given is not None:
                    args, kwargs = given
            return await link.next(*args, **kwargs)

        self._patches.set(asyncpg.pool.Pool, "_acquire", _acquire, link)

    def restore(self) -> None:
        self._timeouts.clear()
        self._patched = False


def _shrunk_arguments(sig: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any],
                      n: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    bound = sig.bind(*args, **kwargs)
    arguments = bound.arguments
    arguments["max_size"] = n
    arguments["min_size"] = min(int(arguments["min_size"]), n)
    if arguments.get("init_size") is not None:
        arguments["init_size"] = min(int(arguments["init_size"]), n)
    return bound.args, bound.kwargs


def shrink_new_pools(patches: patching.Patches, hooks: HookGuard, n: int,
                     closed: Callable[[], bool]) -> None:
    """Every asyncpg pool created from now on gets ``max_size=n``."""
    import asyncpg.pool

    what = "asyncpg pool creation (shrink)"
    cls = asyncpg.pool.Pool
    link = patches.link(cls, "__init__")
    sig = inspect.signature(link.next)

    def body(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not closed() and not hooks.disabled(what, cls):
            shrunk = hooks.safely(LIBRARY, what, cls, _shrunk_arguments, sig, args, kwargs, n)
            if shrunk is not None:
                args, kwargs = shrunk
        return link.next(*args, **kwargs)

    patches.set(cls, "__init__", same_signature(link.next, body), link)
