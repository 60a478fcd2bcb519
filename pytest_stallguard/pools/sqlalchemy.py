"""SQLAlchemy: watch ``Pool.connect`` waits and checkouts, shrink an engine's pool.

Watch: ``Pool.connect`` (the wait for a slot, minus the time ``_create_connection`` spends
opening a new DBAPI connection), the ``checkin`` event (what is still checked out, for the
leak check) and ``Engine.__init__`` (an engine made during a request). Shrink: swap an
engine's pool for a small copy (private ``_creator``, ``_recycle``, ... of SQLAlchemy 2.x),
or make every ``QueuePool`` created from now on small.
"""

from __future__ import annotations

import contextlib
import contextvars
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

__all__ = ["SqlalchemyWatch", "shrink_engine", "shrink_new_pools"]

LIBRARY = "sqlalchemy"
CONNECT = "sqlalchemy Pool.connect"
CREATE = "sqlalchemy Pool._create_connection"
CHECKIN = "sqlalchemy checkin event"
QUERY = "sqlalchemy cursor events"

# Time spent opening new DBAPI connections inside the Pool.connect being measured.
_opening: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar(
    "stallguard_sa_opening", default=None
)


def _add_opening(opening: list[float], started: float) -> None:
    opening[0] += real.perf_counter() - started


def _major() -> int:
    import sqlalchemy

    return int(str(sqlalchemy.__version__).split(".")[0])


class _Connect:
    __slots__ = ("frame", "opening", "preempted", "started", "stats", "token", "wait")

    def __init__(self, stats: Stats, frame: FrameType, core: WatchCore) -> None:
        self.stats = stats
        self.frame = frame
        self.opening = [0.0]
        self.token = _opening.set(self.opening)
        self.started = real.perf_counter()
        self.wait = core.wait_begin(stats, self.started)
        self.preempted = 0.0

    def forget(self) -> None:
        with contextlib.suppress(Exception):
            _opening.reset(self.token)

    def wait_ms(self) -> float:
        return (real.perf_counter() - self.started - self.opening[0]) * 1000.0


class SqlalchemyWatch:
    """Pool waits and checked-out connections of SQLAlchemy (part of :class:`PoolWatch`)."""

    def __init__(self, core: WatchCore) -> None:
        self.core = core
        self._out: dict[int, CheckedOut] = {}  # id(connection record) -> where
        self._held: dict[int, Held] = {}  # id(connection record) -> its checkout
        self._events: list[tuple[Any, str, Callable[..., Any]]] = []

    def install(self) -> None:
        from sqlalchemy import event
        from sqlalchemy.engine.base import Engine
        from sqlalchemy.pool.base import Pool

        core, hooks, watch = self.core, self.core.hooks, self
        link = core.patches.link(Pool, "connect")

        @functools.wraps(link.next)
        def connect(*args: Any, **kwargs: Any) -> Any:
            pool = args[0] if args else None
            if not core.on or hooks.disabled(CONNECT, pool):
                return link.next(*args, **kwargs)
            began: _Connect | None = hooks.safely(
                LIBRARY, CONNECT, pool, watch._begin, pool, sys._getframe(1)
            )
            if began is None:
                return link.next(*args, **kwargs)
            try:
                fairy = link.next(*args, **kwargs)
            except BaseException as exc:
                began.forget()
                hooks.safely(LIBRARY, CONNECT, pool, watch._wait_over, began)
                hooks.safely(LIBRARY, CONNECT, pool, watch._failed, began, exc)
                raise
            began.forget()
            hooks.safely(LIBRARY, CONNECT, pool, watch._wait_over, began)
            if not hooks.disabled(CONNECT, pool):  # half a wait's bookkeeping judges nothing
                hooks.safely(LIBRARY, CONNECT, pool, watch._connected, pool, began, fairy)
            return fairy

        core.patches.set(Pool, "connect", connect, link)

        create_link = core.patches.link(Pool, "_create_connection")

        @functools.wraps(create_link.next)
        def _create_connection(*args: Any, **kwargs: Any) -> Any:
            opening = _opening.get()
            started = real.perf_counter()
            try:
                return create_link.next(*args, **kwargs)
            finally:
                if opening is not None and not hooks.disabled(CREATE):
                    hooks.safely(LIBRARY, CREATE, None, _add_opening, opening, started)

        core.patches.set(Pool, "_create_connection", _create_connection, create_link)

        def on_checkin(dbapi_connection: Any, record: Any) -> None:
            if not hooks.disabled(CHECKIN):
                hooks.safely(LIBRARY, CHECKIN, None, watch._checked_in, record)

        event.listen(Pool, "checkin", on_checkin)
        self._events.append((Pool, "checkin", on_checkin))

        # A query runs on a checked-out connection between these two events (for an async
        # engine too: they fire in the greenlet around the awaited driver call).
        def before_cursor_execute(conn: Any, *args: Any) -> None:
            if watch._held and not hooks.disabled(QUERY):
                hooks.safely(LIBRARY, QUERY, None, watch._query_began, conn)

        def after_cursor_execute(conn: Any, *args: Any) -> None:
            if watch._held and not hooks.disabled(QUERY):
                hooks.safely(LIBRARY, QUERY, None, watch._query_ended, conn)

        def handle_error(context: Any) -> None:
            if watch._held and not hooks.disabled(QUERY):
                conn = getattr(context, "connection", None)
                hooks.safely(LIBRARY, QUERY, None, watch._query_ended, conn)

        # The pool resets (rolls back) a connection on its way back: work, up to checkin.
        def on_reset(dbapi_connection: Any, record: Any, reset_state: Any = None) -> None:
            if watch._held and not hooks.disabled(QUERY):
                hooks.safely(LIBRARY, QUERY, None, watch._reset_began, record)

        def on_reset_1x(dbapi_connection: Any, record: Any) -> None:  # SQLAlchemy 1.x
            on_reset(dbapi_connection, record)

        reset = on_reset if _major() >= 2 else on_reset_1x
        event.listen(Pool, "reset", reset)
        self._events.append((Pool, "reset", reset))
        for name, fn in (("before_cursor_execute", before_cursor_execute),
                         ("after_cursor_execute", after_cursor_execute),
                         ("handle_error", handle_error)):
            event.listen(Engine, name, fn)
            self._events.append((Engine, name, fn))
        core.patches.undo("checkin listener", self._remove_events, target="sqlalchemy Pool")
        core.watch_init(Engine, LIBRARY, "SQLAlchemy engine")

    def _remove_events(self) -> None:
        from sqlalchemy import event

        while self._events:
            target, name, fn = self._events.pop()
            with contextlib.suppress(Exception):
                event.remove(target, name, fn)

    def checked_out(self) -> list[CheckedOut]:
        if self.core.hooks.disabled(CHECKIN):  # returns are not seen: nothing to say
            return []
        with self.core.lock:
            return list(self._out.values())

    # -- bookkeeping (each step runs under HookGuard.safely) ----------------------------
    def _begin(self, pool: Any, frame: FrameType) -> _Connect:
        stats = self.core.stat(pool, f"sqlalchemy {type(pool).__name__}", "sqlalchemy")
        size = getattr(pool, "size", None)
        overflow = getattr(pool, "_max_overflow", 0)
        if callable(size):
            stats.size = int(size()) + max(int(overflow), 0)
        return _Connect(stats, frame, self.core)

    def _wait_over(self, began: _Connect) -> None:
        began.preempted = self.core.wait_end(began.stats, began.wait, began.wait_ms())

    def _failed(self, began: _Connect, exc: BaseException) -> None:
        from sqlalchemy import exc as sa_exc


        if not isinstance(exc, sa_exc.TimeoutError):
            return
        wait_ms = began.wait_ms()
        audit.span("pool_wait", began.started, real.perf_counter())  # issue 10
        with self.core.lock:
            began.stats.timeouts += 1
            began.stats.waits_ms.append(wait_ms)
        self.core.pool_wait(began.stats, wait_ms, began.frame, timed_out=True)

    def _connected(self, pool: Any, began: _Connect, fairy: Any) -> None:
        core, stats = self.core, began.stats
        wait_ms = began.wait_ms()
        # The request's audit (issue 10): the wait, then opening a connection (io).
        audit.span("pool_wait", began.started, began.started + wait_ms / 1000.0)
        audit.span("io", began.started + wait_ms / 1000.0, real.perf_counter())
        info = request_info()
        record = getattr(fairy, "_connection_record", None)
        location = caller_location(began.frame) if record is not None else None
        if record is not None and location is not None:
            held = core.checkout(stats, info, location)
            with core.lock:
                self._held[id(record)] = held
        with core.lock:
            stats.waits_ms.append(wait_ms)
            checked = getattr(pool, "checkedout", None)
            in_use = int(checked()) if callable(checked) else stats.in_use + 1
            stats.in_use = in_use
            stats.max_in_use = max(stats.max_in_use, in_use)
            if record is not None and location is not None:
                self._out[id(record)] = CheckedOut(
                    pool=stats.name, request=None if info is None else info.request,
                    location=location, since=real.perf_counter(), by_request=armed_by(info),
                )
        core.plain_wait(stats, wait_ms, began.preempted, began.frame, began.started)

    def _checked_in(self, record: Any) -> None:
        with self.core.lock:
            self._out.pop(id(record), None)
            held = self._held.pop(id(record), None)
        if held is not None:
            self.core.checkin(held, sys._getframe(2))

    def _held_by(self, conn: Any) -> Held | None:
        """The checkout a SQLAlchemy ``Connection`` runs on (None when not watched)."""
        fairy = getattr(conn, "_dbapi_connection", None)
        record = getattr(fairy, "_connection_record", None)
        return None if record is None else self._held.get(id(record))

    def _query_began(self, conn: Any) -> None:
        held = self._held_by(conn)
        if held is not None:
            self.core.work_begin(held, sys._getframe(2))

    def _reset_began(self, record: Any) -> None:
        held = self._held.get(id(record))
        if held is not None and held.depth == 0:
            self.core.work_begin(held, None)

    def _query_ended(self, conn: Any) -> None:
        held = self._held_by(conn)
        if held is not None:
            self.core.work_end(held)


# -- shrinking ----------------------------------------------------------------------------


def shrink_engine(engine: Any, size: int, overflow: int, timeout: float,
                  undo: list[Callable[[], None]], async_disposals: list[Any]) -> Any:
    """Swap the pool of ``engine`` (``Engine`` or ``AsyncEngine``) for a small one."""
    size = check_size("size", size)
    overflow = check_size("overflow", overflow, minimum=0)
    timeout = check_timeout("timeout", timeout)
    sync_engine = getattr(engine, "sync_engine", engine)
    old = getattr(sync_engine, "pool", None)
    if old is None or not hasattr(old, "_max_overflow"):
        raise TypeError(
            f"shrink_pools.sqlalchemy: {engine!r} has pool {type(old).__name__}, which "
            "has no size to shrink; only QueuePool / AsyncAdaptedQueuePool engines can "
            "be shrunk"
        )
    new = type(old)(
        old._creator,
        pool_size=size,
        max_overflow=overflow,
        timeout=timeout,
        recycle=old._recycle,
        pre_ping=old._pre_ping,
        reset_on_return=old._reset_on_return,
        echo=old.echo,
        logging_name=old._orig_logging_name,
        dialect=old._dialect,
        _dispatch=old.dispatch,
    )
    _async_event_mutex(new)
    sync_engine.pool = new

    def restore() -> None:
        if sync_engine.pool is new:
            sync_engine.pool = old
        if getattr(sync_engine.dialect, "is_async", False):
            async_disposals.append(new)
        else:
            new.dispose()

    undo.append(restore)
    return new


def _async_event_mutex(pool: Any) -> None:
    """Give an asyncio pool built with ``_dispatch=`` the asyncio mutex for its once-only
    events, as SQLAlchemy itself does since 2.0.2x. Before, the copied ``first_connect``
    kept a threading lock: two requests connecting first at once took it twice on the
    loop thread and deadlocked the loop."""
    if not getattr(pool, "_is_asyncio", False):
        return
    for name in ("first_connect", "connect"):
        listeners = getattr(pool.dispatch, name, None)
        set_asyncio = getattr(listeners, "_set_asyncio", None)
        if set_asyncio is not None and not getattr(listeners, "_is_asyncio", False):
            set_asyncio()


def _shrunk_arguments(sig: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any],
                      n: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    bound = sig.bind(*args, **kwargs)
    bound.arguments["pool_size"] = n
    bound.arguments["max_overflow"] = 0
    return bound.args, bound.kwargs


def shrink_new_pools(patches: patching.Patches, hooks: HookGuard, n: int,
                     closed: Callable[[], bool]) -> None:
    """Every ``QueuePool`` created from now on gets ``pool_size=n, max_overflow=0``."""
    from sqlalchemy.pool.impl import QueuePool

    what = "sqlalchemy QueuePool creation (shrink)"
    link = patches.link(QueuePool, "__init__")
    sig = inspect.signature(link.next)

    # create_engine() routes pool_size/max_overflow/timeout to the pool by reading the
    # parameter names of QueuePool.__init__: same_signature keeps them.
    def body(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not closed() and not hooks.disabled(what, QueuePool):
            shrunk = hooks.safely(LIBRARY, what, QueuePool, _shrunk_arguments, sig, args,
                                  kwargs, n)
            if shrunk is not None:
                args, kwargs = shrunk
        return link.next(*args, **kwargs)

    patches.set(QueuePool, "__init__", same_signature(link.next, body), link)
