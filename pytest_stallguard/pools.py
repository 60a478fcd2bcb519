"""Shrink pools for a test, and watch every pool while a guard runs.

Production stalls when a pool runs dry: FastAPI's worker-thread limiter (40 tokens per
loop), a SQLAlchemy pool, an httpx client's connection pool, an asyncpg pool. In a test
with one request at a time none of them is ever short. :class:`ShrinkPools` makes them
small for one test and restores them afterwards; :class:`PoolWatch` records, per request,
how long each wait for a slot took, how long slots were held, the most in use and the
timeouts, and turns long waits into findings:

- ``threadpool-saturation``: a request waited for a worker thread longer than the guard
  threshold (``anyio.to_thread.run_sync`` is wrapped; Starlette and FastAPI look it up at
  call time, so ``def`` endpoints, sync dependencies and ``run_in_threadpool`` are seen;
  ``asyncio.to_thread``/``loop.run_in_executor`` are not);
- ``pool-exhaustion``: a request waited for a SQLAlchemy, httpx or asyncpg slot longer than
  the threshold, or got a pool timeout;
- ``client-per-request``: an httpx client, a SQLAlchemy engine or an asyncpg pool was
  created while a request was being served.

Everything here patches classes and modules, never instances the app holds (except the
pools the test hands to :class:`ShrinkPools`), and every patch is undone by ``stop()`` /
``close()``. Several private attributes are read (httpcore's ``_max_connections``,
SQLAlchemy's ``_creator``, asyncpg's ``_queue``/``_acquire``); each use names the version
it was checked on in FINDINGS.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

import anyio
import anyio.to_thread
import httpcore
import httpx

from . import context, guard
from .location import Location, is_user_file, relative, user_location
from .model import DOCS, PoolStats

__all__ = [
    "POOL_KINDS",
    "CheckedOut",
    "PoolWatch",
    "ShrinkPools",
    "ThreadCall",
    "note_http_pool_wait",
]

POOL_KINDS = ("threads", "sqlalchemy", "httpx", "asyncpg")

_MISSING = object()

THREADPOOL_HELP = (
    "Every `def` endpoint, sync dependency and run_in_threadpool call needs one of the "
    "loop's worker-thread tokens (anyio's default limiter, 40 per loop). Make the endpoint "
    "`async def` with async libraries; raise the limiter "
    "(anyio.to_thread.current_default_thread_limiter().total_tokens) only for I/O-bound "
    "work the downstream can take; keep CPU work off the request path."
)
POOL_HELP = (
    "Requests queue for a pool slot. Make the pool bigger only if the database or upstream "
    "allows that many connections; set a short pool timeout and answer a clean 503 when it "
    "fires; never hold a connection while awaiting a slow upstream call."
)
CLIENT_HELP = (
    "Creating a client, engine or pool per request opens new connections (and a new TLS "
    "handshake) every time and defeats pooling and its limits. Create it once at startup "
    "(the lifespan) and share it."
)


# -- small helpers ------------------------------------------------------------------------


class _Link:
    """What a patch layer calls next: re-pointed when a layer below it is removed."""

    def __init__(self, next_: Any) -> None:
        self.next = next_


_registry_lock = threading.RLock()
# (id(target), name) -> (target, what target's own __dict__/attr held, [(wrapper, link)])
_registry: dict[tuple[int, str], tuple[Any, Any, list[tuple[Any, _Link]]]] = {}


class _Patches:
    """Layered attribute patches that can be removed in any order.

    Several owners (the watch, the shrinker, another test's leftovers) may patch the same
    attribute. Each layer calls ``link.next``; removing a layer re-points the layer above
    it, and removing the last one puts the original back (or deletes our attribute when
    the original was inherited).
    """

    def __init__(self) -> None:
        self._mine: list[tuple[Any, str, Any]] = []

    def link(self, target: Any, name: str) -> _Link:
        return _Link(getattr(target, name))

    def set(self, target: Any, name: str, new: Any, link: _Link) -> None:
        with _registry_lock:
            key = (id(target), name)
            entry = _registry.get(key)
            if entry is None:
                own = vars(target).get(name, _MISSING) if isinstance(target, type) else (
                    getattr(target, name, _MISSING))
                entry = (target, own, [])
                _registry[key] = entry
            link.next = getattr(target, name)
            setattr(target, name, new)
            entry[2].append((new, link))
            self._mine.append((target, name, new))

    def restore(self) -> None:
        with _registry_lock:
            while self._mine:
                target, name, new = self._mine.pop()
                key = (id(target), name)
                entry = _registry.get(key)
                if entry is None:
                    continue
                _, own, layers = entry
                index = next((i for i, (w, _) in enumerate(layers) if w is new), None)
                if index is None:
                    continue
                _, link = layers.pop(index)
                if index < len(layers):  # a layer above ours: make it skip ours
                    layers[index][1].next = link.next
                else:
                    current = vars(target).get(name) if isinstance(target, type) else (
                        getattr(target, name, None))
                    if current is new:
                        if not layers and own is _MISSING:
                            with contextlib.suppress(AttributeError):
                                delattr(target, name)
                        else:
                            setattr(target, name, link.next)
                    # else: patched over by someone else; our layer stays, inert (_on)
                if not layers:
                    del _registry[key]

    def __bool__(self) -> bool:
        return bool(self._mine)


def _find_user(frame: FrameType | None, stop_at_boundary: bool = False) -> Location | None:
    """The first user frame walking out, or None (optionally not past the ASGI boundary)."""
    while frame is not None:
        code = frame.f_code
        if stop_at_boundary and code.co_name == "stallguard_attributed":
            return None
        if is_user_file(code.co_filename):
            return relative(code.co_filename), frame.f_lineno, code.co_name
        frame = frame.f_back
    return None


def _greenlet_parent_frame() -> FrameType | None:
    """SQLAlchemy's async engines run pool code in a child greenlet: the user's frames are
    in the parent (the task), suspended in ``greenlet_spawn``."""
    mod = sys.modules.get("greenlet")
    if mod is None:
        return None
    current = mod.getcurrent()
    parent = getattr(current, "parent", None)
    if parent is None or not getattr(current, "__sqlalchemy_greenlet_provider__", False):
        return None
    frame = getattr(parent, "gr_frame", None)
    return frame if isinstance(frame, FrameType) else None


def _caller_location(frame: FrameType | None) -> Location:
    found = _find_user(frame)
    if found is None:
        found = _find_user(_greenlet_parent_frame())
    return found if found is not None else user_location(frame)


def _request_info() -> context.RequestInfo | None:
    """The request running this code, unless paused (works in threads and greenlets)."""
    return context.info_of(contextvars.copy_context())


def _is_request(info: context.RequestInfo | None) -> bool:
    if info is None:
        return False
    method, _, path = info.label.partition(" ")
    return bool(path) and (method.isupper())


def _endpoint_location(frame: FrameType | None) -> Location | None:
    """The endpoint of the ASGI scope of the request being served (Starlette routing puts
    it in ``scope["endpoint"]``), found in the frames up to the request boundary."""
    while frame is not None:
        if frame.f_code.co_name == "stallguard_attributed":
            return None
        scope = frame.f_locals.get("scope")
        if isinstance(scope, dict) and "endpoint" in scope:
            found = _unwrap_user_function(scope["endpoint"])
            if found is not None:
                return found
        frame = frame.f_back
    return None


def _unwrap_user_function(func: Any, depth: int = 0) -> Location | None:
    """The user function behind a (partial of a) callable handed to the threadpool."""
    if depth > 5 or func is None:
        return None
    if isinstance(func, functools.partial):
        for candidate in (*func.keywords.values(), *func.args, func.func):
            if callable(candidate):
                found = _unwrap_user_function(candidate, depth + 1)
                if found is not None:
                    return found
        return None
    inner = getattr(func, "__func__", func)
    inner = getattr(inner, "__wrapped__", inner)
    code = getattr(inner, "__code__", None)
    if code is not None and is_user_file(code.co_filename):
        return relative(code.co_filename), code.co_firstlineno, code.co_name
    return None


# -- statistics ---------------------------------------------------------------------------


@dataclass
class _Stats:
    name: str
    kind: str
    size: int = 0
    in_use: int = 0
    max_in_use: int = 0
    waits_ms: list[float] = field(default_factory=list)
    timeouts: int = 0

    def enter(self) -> None:
        self.in_use += 1
        self.max_in_use = max(self.max_in_use, self.in_use)

    def freeze(self) -> PoolStats:
        return PoolStats(
            name=self.name, kind=self.kind, size=self.size, max_in_use=self.max_in_use,
            waits_ms=tuple(self.waits_ms), timeouts=self.timeouts,
        )


@dataclass
class ThreadCall:
    """One call handed to a worker thread for a request."""

    function: str
    request: str
    location: Location
    called: float
    started: float | None = None  # in the worker: the token was granted
    ended: float | None = None  # in the worker: the thread is free again
    cancelled: float | None = None  # the awaiting request was cancelled
    thread: int | None = None


@dataclass
class CheckedOut:
    """A SQLAlchemy / asyncpg connection checked out (and not yet returned)."""

    pool: str
    request: str | None
    location: Location
    since: float


@dataclass
class _HttpCall:
    wait_s: float = 0.0


_http_call: contextvars.ContextVar[_HttpCall | None] = contextvars.ContextVar(
    "stallguard_http_call", default=None
)


# Time spent opening new DBAPI connections inside the Pool.connect being measured.
_sa_opening: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar(
    "stallguard_sa_opening", default=None
)


def note_http_pool_wait(seconds: float) -> None:
    """Add ``seconds`` of pool wait to the httpx call being made (used by the fakes)."""
    call = _http_call.get()
    if call is not None:
        call.wait_s += seconds


# -- the watch ----------------------------------------------------------------------------


class PoolWatch:
    """Watch every pool while armed. Sync ``start()``/``stop()``, callable in or out of
    the loop; ``stop()`` is idempotent and restores every patch.

    ``guard_`` defaults to :func:`guard.active` at the time of each finding.
    """

    def __init__(self, guard_: guard.Guard | None = None, *, threshold_ms: float | None = None
                 ) -> None:
        self._guard = guard_
        self._threshold_ms = threshold_ms
        self._patches = _Patches()
        self._lock = threading.Lock()
        self._on = False
        self._stats: dict[int, _Stats] = {}
        self._keep: dict[int, Any] = {}  # keeps ids stable while stats exist
        self._names: dict[str, int] = {}
        self.thread_calls: list[ThreadCall] = []
        self._running: set[int] = set()  # ids of ThreadCall running in a worker
        self._checked_out: dict[int, CheckedOut] = {}
        self.transports: weakref.WeakSet[Any] = weakref.WeakSet()
        self._transport_users: dict[int, Location] = {}  # last user line that called it
        self._asyncpg_out: dict[int, tuple[weakref.ref[Any], CheckedOut]] = {}
        self._sa_events: list[tuple[Any, str, Callable[..., Any]]] = []

    # -- arming ------------------------------------------------------------------------
    def start(self) -> PoolWatch:
        if self._on:
            return self
        self._on = True
        try:
            self._patch_threads()
            self._patch_httpx()
            if "sqlalchemy" in sys.modules:
                self._patch_sqlalchemy()
            if "asyncpg" in sys.modules:
                self._patch_asyncpg()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._on = False
        self._patches.restore()
        if self._sa_events:
            from sqlalchemy import event

            while self._sa_events:
                target, name, fn = self._sa_events.pop()
                with contextlib.suppress(Exception):
                    event.remove(target, name, fn)

    def __enter__(self) -> PoolWatch:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def threshold_ms(self) -> float:
        if self._threshold_ms is not None:
            return self._threshold_ms
        g = self._active_guard()
        return g.threshold_ms if g is not None else 20.0

    def _active_guard(self) -> guard.Guard | None:
        return self._guard if self._guard is not None else guard.active()

    def _stat(self, key: Any, name: str, kind: str) -> _Stats:
        with self._lock:
            stats = self._stats.get(id(key))
            if stats is None:
                count = self._names.get(name, 0)
                self._names[name] = count + 1
                stats = _Stats(name if not count else f"{name} #{count + 1}", kind)
                self._stats[id(key)] = stats
                self._keep[id(key)] = key
            return stats

    def stats(self) -> list[PoolStats]:
        with self._lock:
            return [s.freeze() for s in self._stats.values()]

    # -- what the leak check reads -----------------------------------------------------
    def busy_threads(self) -> list[ThreadCall]:
        """Worker-thread calls for a request that have not finished."""
        with self._lock:
            return [c for c in self.thread_calls if id(c) in self._running]

    def checked_out(self) -> list[CheckedOut]:
        """SQLAlchemy and asyncpg connections checked out and not returned yet."""
        with self._lock:
            out = list(self._checked_out.values())
            for key, (ref, record) in list(self._asyncpg_out.items()):
                holder = ref()
                if holder is None or getattr(holder, "_in_use", None) is None:
                    del self._asyncpg_out[key]
                else:
                    out.append(record)
            return out

    def transport_user(self, transport: Any) -> Location | None:
        """The last user line that sent a request through ``transport``."""
        with self._lock:
            return self._transport_users.get(id(transport))

    def _record(self, kind: str, message: str, *, location: Location, request: str | None,
                duration_ms: float | None = None, call: str | None = None,
                frame: FrameType | None = None) -> None:
        g = self._active_guard()
        if g is None:
            return
        if frame is not None and g.allowed(frame):
            return
        g.record(kind, message, location=location, request=request, duration_ms=duration_ms,
                 call=call)

    # -- threads -----------------------------------------------------------------------
    def _patch_threads(self) -> None:
        link = self._patches.link(anyio.to_thread, "run_sync")
        watch = self

        async def run_sync(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            info = _request_info()
            if not watch._on or info is None:
                return await link.next(func, *args, **kwargs)
            caller = sys._getframe(1)
            return await watch._run_sync(link.next, caller, info, func, args, kwargs)

        self._patches.set(anyio.to_thread, "run_sync", run_sync, link)

    async def _run_sync(self, original: Callable[..., Any], caller: FrameType,
                        info: context.RequestInfo, func: Callable[..., Any],
                        args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        limiter = kwargs.get("limiter")
        # Only the shared default limiter saturates by accident (every `def` endpoint and
        # sync dependency draws on it). A limiter the app made for itself is deliberate
        # back-pressure (CPU work, one thread at a time): its waits are reported in the
        # pools section, not as a finding.
        shared = limiter is None
        if limiter is None:
            limiter = anyio.to_thread.current_default_thread_limiter()
            key: Any = limiter
            name = "anyio worker threads"
        else:
            key, name = limiter, f"anyio limiter {type(limiter).__name__}"
        stats = self._stat(key, name, "threadpool")
        stats.size = int(limiter.total_tokens)
        # A wait only counts as saturation when the pool was full: every token taken at
        # call time, or every other token still busy when this call got one (calls issued
        # together all see free tokens before any is borrowed). With tokens free, a late
        # start is the GIL or a busy loop, not the pool (measured: up to ~50 ms under a
        # 40-wide burst of trivial `def` requests with 1 thread in use).
        full = [limiter.borrowed_tokens >= limiter.total_tokens]
        location = (
            _unwrap_user_function(func)
            or _endpoint_location(caller)
            or _find_user(caller, stop_at_boundary=True)
            or user_location(caller)
        )
        target = _unwrap_user_function(func)
        call = ThreadCall(
            function=target[2] or "?" if target is not None
            else getattr(func, "__qualname__", type(func).__name__),
            request=info.request, location=location, called=context.perf_counter(),
        )
        watch = self

        def in_worker(*a: Any) -> Any:
            call.started = context.perf_counter()
            call.thread = threading.get_ident()
            with watch._lock:
                watch._running.add(id(call))
                if stats.in_use >= stats.size - 1:
                    full[0] = True
                stats.enter()
            try:
                return func(*a)
            finally:
                call.ended = context.perf_counter()
                with watch._lock:
                    watch._running.discard(id(call))
                    stats.in_use -= 1

        with self._lock:
            self.thread_calls.append(call)
        try:
            return await original(in_worker, *args, **kwargs)
        except anyio.get_cancelled_exc_class():
            call.cancelled = context.perf_counter()
            raise
        finally:
            granted = call.started if call.started is not None else context.perf_counter()
            wait_ms = (granted - call.called) * 1000.0
            with self._lock:
                stats.waits_ms.append(wait_ms)
            if shared and full[0] and wait_ms > self.threshold_ms:
                self._record(
                    "threadpool-saturation",
                    f"{call.request} waited {wait_ms:.0f} ms for a worker thread to run "
                    f"{call.function} (threshold {self.threshold_ms:g} ms; limiter of "
                    f"{stats.size} tokens, {stats.max_in_use} busy at most). "
                    f"{THREADPOOL_HELP} See {DOCS}threadpool-saturation",
                    location=location, request=call.request, duration_ms=wait_ms,
                    call="to_thread.run_sync", frame=caller,
                )

    # -- httpx -------------------------------------------------------------------------
    def _patch_httpx(self) -> None:
        watch = self
        a_link = self._patches.link(httpx.AsyncHTTPTransport, "handle_async_request")
        s_link = self._patches.link(httpx.HTTPTransport, "handle_request")

        async def handle_async_request(transport: Any, request: httpx.Request) -> Any:
            if not watch._on:
                return await a_link.next(transport, request)
            frame = sys._getframe(1)
            record = _HttpCall()
            token = _http_call.set(record)
            stats = watch._http_enter(transport, frame)
            try:
                return await a_link.next(transport, request)
            except httpx.PoolTimeout:
                watch._http_timeout(stats, request, record, frame)
                raise
            finally:
                _http_call.reset(token)
                watch._http_leave(stats, request, record, frame)

        def handle_request(transport: Any, request: httpx.Request) -> Any:
            if not watch._on:
                return s_link.next(transport, request)
            frame = sys._getframe(1)
            record = _HttpCall()
            token = _http_call.set(record)
            stats = watch._http_enter(transport, frame)
            try:
                return s_link.next(transport, request)
            except httpx.PoolTimeout:
                watch._http_timeout(stats, request, record, frame)
                raise
            finally:
                _http_call.reset(token)
                watch._http_leave(stats, request, record, frame)

        self._patches.set(
            httpx.AsyncHTTPTransport, "handle_async_request", handle_async_request, a_link
        )
        self._patches.set(httpx.HTTPTransport, "handle_request", handle_request, s_link)

        # The wait for a connection inside httpcore's pool (httpcore 1.0.9).
        from httpcore._async.connection_pool import AsyncPoolRequest
        from httpcore._sync.connection_pool import PoolRequest

        a_wait = self._patches.link(AsyncPoolRequest, "wait_for_connection")
        s_wait = self._patches.link(PoolRequest, "wait_for_connection")

        async def a_wait_for_connection(self: Any, timeout: float | None = None) -> Any:
            started = context.perf_counter()
            try:
                return await a_wait.next(self, timeout)
            finally:
                note_http_pool_wait(context.perf_counter() - started)

        def s_wait_for_connection(self: Any, timeout: float | None = None) -> Any:
            started = context.perf_counter()
            try:
                return s_wait.next(self, timeout)
            finally:
                note_http_pool_wait(context.perf_counter() - started)

        self._patches.set(AsyncPoolRequest, "wait_for_connection", a_wait_for_connection, a_wait)
        self._patches.set(PoolRequest, "wait_for_connection", s_wait_for_connection, s_wait)

        # client-per-request
        for cls in (httpx.AsyncClient, httpx.Client):
            self._patch_init(cls, "httpx client")

    def _http_enter(self, transport: Any, frame: FrameType) -> _Stats:
        location = _caller_location(frame)
        with self._lock:
            self.transports.add(transport)
            self._transport_users[id(transport)] = location
        pool = getattr(transport, "_pool", None)
        stats = self._stat(pool if pool is not None else transport, "httpx pool", "httpx")
        limit = getattr(pool, "_max_connections", None)
        with self._lock:
            stats.size = limit if isinstance(limit, int) else 0
            stats.enter()
        return stats

    def _http_timeout(self, stats: _Stats, request: httpx.Request, record: _HttpCall,
                      frame: FrameType) -> None:
        with self._lock:
            stats.timeouts += 1
        info = _request_info()
        if info is None:
            return
        self._record(
            "pool-exhaustion",
            f"{info.request}: the call to {request.method} {request.url} got PoolTimeout "
            f"after waiting {record.wait_s * 1000:.0f} ms for a connection of an httpx "
            f"pool of {stats.size}. {POOL_HELP} See {DOCS}pool-exhaustion",
            location=_caller_location(frame), request=info.request,
            duration_ms=record.wait_s * 1000, call=f"httpx {request.url.host}", frame=frame,
        )

    def _http_leave(self, stats: _Stats, request: httpx.Request, record: _HttpCall,
                    frame: FrameType) -> None:
        wait_ms = record.wait_s * 1000.0
        with self._lock:
            stats.in_use -= 1
            stats.waits_ms.append(wait_ms)
        if wait_ms <= self.threshold_ms:
            return
        info = _request_info()
        if info is None:
            return
        self._record(
            "pool-exhaustion",
            f"{info.request} waited {wait_ms:.0f} ms for a connection of an httpx pool of "
            f"{stats.size} to call {request.method} {request.url} (threshold "
            f"{self.threshold_ms:g} ms). {POOL_HELP} See {DOCS}pool-exhaustion",
            location=_caller_location(frame), request=info.request, duration_ms=wait_ms,
            call=f"httpx {request.url.host}", frame=frame,
        )

    # -- client-per-request ------------------------------------------------------------
    def _patch_init(self, cls: type, what: str) -> None:
        link = self._patches.link(cls, "__init__")
        watch = self

        @functools.wraps(link.next)
        def __init__(obj: Any, *args: Any, **kwargs: Any) -> None:
            link.next(obj, *args, **kwargs)
            if watch._on:
                watch._created(what, sys._getframe(1))

        self._patches.set(cls, "__init__", __init__, link)

    def _created(self, what: str, frame: FrameType) -> None:
        if not self._on:
            return
        info = _request_info()
        if not _is_request(info):
            return
        assert info is not None
        location = _caller_location(frame)
        self._record(
            "client-per-request",
            f"A new {what} was created while serving {info.request}. {CLIENT_HELP} "
            f"See {DOCS}client-per-request",
            location=location, request=info.request, call=what, frame=frame,
        )

    # -- sqlalchemy --------------------------------------------------------------------
    def _patch_sqlalchemy(self) -> None:
        from sqlalchemy import event, exc
        from sqlalchemy.engine.base import Engine
        from sqlalchemy.pool.base import Pool

        watch = self
        link = self._patches.link(Pool, "connect")

        def connect(pool: Any) -> Any:
            if not watch._on:
                return link.next(pool)
            frame = sys._getframe(1)
            stats = watch._stat(pool, f"sqlalchemy {type(pool).__name__}", "sqlalchemy")
            size = getattr(pool, "size", None)
            overflow = getattr(pool, "_max_overflow", 0)
            if callable(size):
                stats.size = int(size()) + max(int(overflow), 0)
            # The wait for a slot, not the time to open a new DBAPI connection.
            opening = [0.0]
            token = _sa_opening.set(opening)
            started = context.perf_counter()
            try:
                fairy = link.next(pool)
            except exc.TimeoutError:
                wait_ms = (context.perf_counter() - started - opening[0]) * 1000.0
                with watch._lock:
                    stats.timeouts += 1
                    stats.waits_ms.append(wait_ms)
                watch._sa_wait(stats, wait_ms, frame, timed_out=True)
                raise
            finally:
                _sa_opening.reset(token)
            wait_ms = (context.perf_counter() - started - opening[0]) * 1000.0
            info = _request_info()
            record = getattr(fairy, "_connection_record", None)
            with watch._lock:
                stats.waits_ms.append(wait_ms)
                checked = getattr(pool, "checkedout", None)
                in_use = int(checked()) if callable(checked) else stats.in_use + 1
                stats.in_use = in_use
                stats.max_in_use = max(stats.max_in_use, in_use)
                if record is not None:
                    watch._checked_out[id(record)] = CheckedOut(
                        pool=stats.name, request=None if info is None else info.request,
                        location=_caller_location(frame), since=context.perf_counter(),
                    )
            if wait_ms > watch.threshold_ms:
                watch._sa_wait(stats, wait_ms, frame, timed_out=False)
            return fairy

        def on_checkin(dbapi_connection: Any, record: Any) -> None:
            with watch._lock:
                watch._checked_out.pop(id(record), None)

        self._patches.set(Pool, "connect", connect, link)

        create_link = self._patches.link(Pool, "_create_connection")

        def _create_connection(pool: Any) -> Any:
            opening = _sa_opening.get()
            started = context.perf_counter()
            try:
                return create_link.next(pool)
            finally:
                if opening is not None:
                    opening[0] += context.perf_counter() - started

        self._patches.set(Pool, "_create_connection", _create_connection, create_link)
        event.listen(Pool, "checkin", on_checkin)
        self._sa_events.append((Pool, "checkin", on_checkin))
        self._patch_init(Engine, "SQLAlchemy engine")

    def _sa_wait(self, stats: _Stats, wait_ms: float, frame: FrameType, *, timed_out: bool
                 ) -> None:
        info = _request_info()
        if info is None:
            return
        what = (f"got a pool timeout after waiting {wait_ms:.0f} ms" if timed_out
                else f"waited {wait_ms:.0f} ms (threshold {self.threshold_ms:g} ms)")
        self._record(
            "pool-exhaustion",
            f"{info.request} {what} for a connection of {stats.name} (size {stats.size}, "
            f"{stats.max_in_use} in use at most). {POOL_HELP} See {DOCS}pool-exhaustion",
            location=_caller_location(frame), request=info.request, duration_ms=wait_ms,
            call=stats.name, frame=frame,
        )

    # -- asyncpg -----------------------------------------------------------------------
    def _patch_asyncpg(self) -> None:
        import asyncio

        import asyncpg.pool  # type: ignore[import-untyped]

        watch = self
        link = self._patches.link(asyncpg.pool.Pool, "_acquire")

        async def _acquire(pool: Any, timeout: Any) -> Any:
            if not watch._on:
                return await link.next(pool, timeout)
            frame = sys._getframe(1)
            stats = watch._stat(pool, "asyncpg pool", "asyncpg")
            stats.size = int(getattr(pool, "_maxsize", 0))
            started = context.perf_counter()
            try:
                proxy = await link.next(pool, timeout)
            except asyncio.TimeoutError:
                wait_ms = (context.perf_counter() - started) * 1000.0
                with watch._lock:
                    stats.timeouts += 1
                    stats.waits_ms.append(wait_ms)
                watch._sa_wait(stats, wait_ms, frame, timed_out=True)
                raise
            wait_ms = (context.perf_counter() - started) * 1000.0
            info = _request_info()
            holder = getattr(proxy, "_holder", None)
            with watch._lock:
                stats.waits_ms.append(wait_ms)
                holders = getattr(pool, "_holders", ())
                in_use = sum(1 for h in holders if getattr(h, "_in_use", None) is not None)
                stats.max_in_use = max(stats.max_in_use, in_use)
                if holder is not None:
                    watch._asyncpg_out[id(holder)] = (weakref.ref(holder), CheckedOut(
                        pool=stats.name, request=None if info is None else info.request,
                        location=_caller_location(frame), since=context.perf_counter(),
                    ))
            if wait_ms > watch.threshold_ms:
                watch._sa_wait(stats, wait_ms, frame, timed_out=False)
            return proxy

        self._patches.set(asyncpg.pool.Pool, "_acquire", _acquire, link)
        self._patch_init(asyncpg.pool.Pool, "asyncpg pool")


# -- shrinking ----------------------------------------------------------------------------


# asyncpg pools (which have __slots__) given a default acquire timeout by ShrinkPools.
_asyncpg_default_timeouts: dict[int, float] = {}


def _check_size(kind: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"shrink_pools: {kind}={value!r} is not valid; give an int >= {minimum}"
        )
    return value


def _check_timeout(kind: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"shrink_pools: {kind}={value!r} is not valid; give seconds > 0")
    return float(value)


class ShrinkPools:
    """Make pools small for one test; restore them with :meth:`aclose` (or :meth:`close`).

    Construct anywhere. ``threads`` needs the loop: called inside it, it applies at once;
    called outside, it applies at the first ``to_thread.run_sync`` of any loop.
    ``aclose()`` must run in the loop for SQLAlchemy async engines (the temporary pool is
    disposed with ``greenlet_spawn``); ``close()`` restores everything from sync code and
    disposes only sync pools.
    """

    def __init__(self) -> None:
        self._patches = _Patches()
        self._undo: list[Callable[[], Any]] = []  # sync restore steps, LIFO
        self._async_disposals: list[Any] = []  # temporary async pools to dispose
        self._limiters: list[tuple[Any, float]] = []
        self._threads: int | None = None
        self._threads_patched = False
        self._applied: dict[str, Any] = {}
        self._closed = False
        self._asyncpg_patched = False
        self._asyncpg_pools: list[Any] = []  # keeps ids in the timeout table valid

    # -- threads -----------------------------------------------------------------------
    def threads(self, n: int) -> None:
        """Set the worker-thread limiter of the running loop (or of the next one) to ``n``."""
        self._threads = _check_size("threads", n)
        try:
            limiter = anyio.to_thread.current_default_thread_limiter()
        except Exception:  # no running loop here: apply at the first worker-thread call
            limiter = None
        if limiter is not None:
            self._set_limiter(limiter)
        self._patch_run_sync()

    def _set_limiter(self, limiter: Any) -> None:
        assert self._threads is not None
        if not any(existing is limiter for existing, _ in self._limiters):
            self._limiters.append((limiter, limiter.total_tokens))
        limiter.total_tokens = self._threads

    def _patch_run_sync(self) -> None:
        if self._threads_patched:
            return
        self._threads_patched = True
        link = self._patches.link(anyio.to_thread, "run_sync")
        shrink = self

        async def run_sync(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if shrink._threads is not None and not shrink._closed:
                limiter = anyio.to_thread.current_default_thread_limiter()
                if limiter.total_tokens != shrink._threads:
                    shrink._set_limiter(limiter)
            return await link.next(func, *args, **kwargs)

        self._patches.set(anyio.to_thread, "run_sync", run_sync, link)

    # -- sqlalchemy --------------------------------------------------------------------
    def sqlalchemy(self, engine: Any, size: int = 2, overflow: int = 0, timeout: float = 0.5
                   ) -> Any:
        """Swap the pool of ``engine`` (``Engine`` or ``AsyncEngine``) for a small one.

        Returns the temporary pool. Only QueuePool-style pools can be shrunk.
        """
        size = _check_size("size", size)
        overflow = _check_size("overflow", overflow, minimum=0)
        timeout = _check_timeout("timeout", timeout)
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
        sync_engine.pool = new

        def undo() -> None:
            if sync_engine.pool is new:
                sync_engine.pool = old
            if getattr(sync_engine.dialect, "is_async", False):
                self._async_disposals.append(new)
            else:
                new.dispose()

        self._undo.append(undo)
        return new

    # -- httpx -------------------------------------------------------------------------
    def httpx(self, client: httpx.AsyncClient | httpx.Client, max_connections: int = 2,
              pool_timeout: float = 0.5) -> None:
        """Limit the client's connection pools to ``max_connections`` and its pool timeout
        to ``pool_timeout`` (httpcore pool private attributes, httpcore 1.0)."""
        max_connections = _check_size("max_connections", max_connections)
        pool_timeout = _check_timeout("pool_timeout", pool_timeout)
        if not isinstance(client, (httpx.AsyncClient, httpx.Client)):
            raise TypeError(
                f"shrink_pools.httpx: give an httpx.AsyncClient or httpx.Client, got {client!r}"
            )
        pools = _client_pools(client)
        if not pools:
            raise TypeError(
                f"shrink_pools.httpx: {client!r} has no httpcore connection pool (a custom or "
                "ASGI transport?); nothing to shrink"
            )
        for pool in pools:
            saved = (pool._max_connections, pool._max_keepalive_connections)
            _limit_pool(pool, max_connections)

            def undo(pool: Any = pool, saved: tuple[int, int] = saved) -> None:
                pool._max_connections, pool._max_keepalive_connections = saved

            self._undo.append(undo)
        old_timeout = client.timeout
        client.timeout = httpx.Timeout(
            connect=old_timeout.connect, read=old_timeout.read, write=old_timeout.write,
            pool=pool_timeout,
        )

        def undo_timeout() -> None:
            client.timeout = old_timeout

        self._undo.append(undo_timeout)

    # -- asyncpg -----------------------------------------------------------------------
    async def asyncpg(self, pool: Any, size: int = 2, timeout: float = 0.5) -> None:
        """Let at most ``size`` connections of an initialised asyncpg pool be acquired at
        once, and give ``acquire()`` a default ``timeout`` (asyncpg has none).

        Works by taking spare connection holders out of the pool's queue (asyncpg 0.30
        private ``_queue``) until the test ends; it waits (bounded by ``timeout``) for
        holders in use to come back. Holders are put back at close.
        """
        import asyncio

        size = _check_size("size", size)
        timeout = _check_timeout("timeout", timeout)
        queue = getattr(pool, "_queue", None)
        maxsize = getattr(pool, "_maxsize", None)
        if queue is None or not isinstance(maxsize, int):
            raise TypeError(
                f"shrink_pools.asyncpg: {pool!r} is not an initialised asyncpg pool "
                "(await asyncpg.create_pool(...) first)"
            )
        held: list[Any] = []

        def undo() -> None:
            while held:
                queue.put_nowait(held.pop())
            _asyncpg_default_timeouts.pop(id(pool), None)

        self._undo.append(undo)
        for _ in range(max(maxsize - size, 0)):
            try:
                held.append(queue.get_disconnected_nowait())
            except asyncio.QueueEmpty:
                held.append(await asyncio.wait_for(queue.get(), timeout))

        _asyncpg_default_timeouts[id(pool)] = timeout
        self._asyncpg_pools.append(pool)
        if not self._asyncpg_patched:
            self._asyncpg_patched = True
            import asyncpg.pool

            link = self._patches.link(asyncpg.pool.Pool, "_acquire")

            async def _acquire(p: Any, t: Any) -> Any:
                if t is None:
                    t = _asyncpg_default_timeouts.get(id(p))
                return await link.next(p, t)

            self._patches.set(asyncpg.pool.Pool, "_acquire", _acquire, link)

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
            _check_size(f'pools["{key}"]', value)
        self._applied = dict(spec)
        if "threads" in spec:
            self.threads(spec["threads"])
        if "httpx" in spec:
            self._apply_httpx(spec["httpx"])
        if "sqlalchemy" in spec:
            self._apply_sqlalchemy(spec["sqlalchemy"])
        if "asyncpg" in spec:
            self._apply_asyncpg(spec["asyncpg"])

    def _apply_httpx(self, n: int) -> None:
        for cls in (httpcore.AsyncConnectionPool, httpcore.ConnectionPool):
            link = self._patches.link(cls, "__init__")

            def __init__(pool: Any, *args: Any, _link: _Link = link, **kwargs: Any) -> None:
                _link.next(pool, *args, **kwargs)
                if not self._closed:
                    _limit_pool(pool, n)

            self._patches.set(cls, "__init__", __init__, link)

    def _apply_sqlalchemy(self, n: int) -> None:
        from sqlalchemy.pool.impl import QueuePool

        link = self._patches.link(QueuePool, "__init__")

        # Same named parameters as QueuePool.__init__: create_engine() inspects them to
        # route pool_size/max_overflow/timeout to the pool.
        def __init__(pool: Any, creator: Any, pool_size: int = 5, max_overflow: int = 10,
                     timeout: float = 30.0, use_lifo: bool = False, **kw: Any) -> None:
            if not self._closed:
                pool_size, max_overflow = n, 0
            link.next(pool, creator, pool_size=pool_size, max_overflow=max_overflow,
                      timeout=timeout, use_lifo=use_lifo, **kw)

        self._patches.set(QueuePool, "__init__", __init__, link)

    def _apply_asyncpg(self, n: int) -> None:
        import asyncpg.pool

        link = self._patches.link(asyncpg.pool.Pool, "__init__")

        def __init__(pool: Any, *args: Any, **kwargs: Any) -> None:
            if not self._closed:
                kwargs["max_size"] = n
                kwargs["min_size"] = min(int(kwargs.get("min_size", 10)), n)
            link.next(pool, *args, **kwargs)

        self._patches.set(asyncpg.pool.Pool, "__init__", __init__, link)

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
        while self._limiters:
            limiter, tokens = self._limiters.pop()
            try:
                limiter.total_tokens = tokens
            except BaseException as exc:
                errors.append(exc)
        self._threads = None
        self._threads_patched = False
        self._asyncpg_patched = False
        self._asyncpg_pools.clear()
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


def _client_pools(client: httpx.AsyncClient | httpx.Client) -> list[Any]:
    transports: Iterable[Any] = [client._transport, *client._mounts.values()]
    pools = []
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        if pool is not None and hasattr(pool, "_max_connections"):
            pools.append(pool)
    return pools


def _limit_pool(pool: Any, n: int) -> None:
    pool._max_connections = n
    pool._max_keepalive_connections = min(pool._max_keepalive_connections, n)
