"""httpx and httpcore: every private attribute of theirs that stallguard reads is here.

Watch: the transports' ``handle_(async_)request`` (stats, pool timeouts, the user's line,
and ``missing-timeout``: every outbound call of a request is judged here, whatever answers
it: a respx fake, a loopback server or a real host),
httpcore's ``PoolRequest.wait_for_connection`` (the wait for a slot, httpcore 1.0.9) and
client creation during a request. Shrink: a client's pools (``_max_connections``) or every
pool created from now on. Leaks: :func:`stuck_pools` finds connections stuck CONNECTING or
busy with no request (``_requests``, ``connection.info()``), read by the leak check.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from types import FrameType
from typing import Any

import httpcore
import httpx

from .. import audit, patching
from ..clock import real
from ..location import Location
from ..model import DOCS
from .common import (
    POOL_HELP,
    HookGuard,
    Stats,
    WatchCore,
    caller_location,
    check_size,
    check_timeout,
    request_info,
    same_signature,
)

__all__ = [
    "MISSING_TIMEOUT_HELP",
    "HttpxWatch",
    "StuckPool",
    "client_pools",
    "note_http_pool_wait",
    "shrink_client",
    "shrink_new_pools",
    "stuck_connections",
    "stuck_pools",
    "transport_judged_timeout",
    "unbounded_phases",
    "untimed_message",
]

LIBRARY = "httpx"
CORE_LIBRARY = "httpcore"
TRANSPORT = "httpx transport requests"
WAIT = "httpcore pool waits"
TIMEOUTS = "httpx call timeouts"

MISSING_TIMEOUT_HELP = (
    "A call with an unbounded phase waits as long as the upstream takes and holds a "
    "connection (and the request) all that time; a connect timeout alone does not bound "
    "the wait for the answer. Give the shared client a timeout for every phase, e.g. "
    "httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0)), and turn the timeout "
    "into a clean error response."
)
_PHASES = ("connect", "read", "write", "pool")
_JUDGED = ("read", "pool")  # a call with either unbounded can wait forever


def unbounded_phases(timeout: Any) -> list[str] | None:
    """The phases of ``request.extensions["timeout"]`` with no bound (httpcore reads a
    missing key as None), when that leaves the call able to wait forever (``read`` or
    ``pool`` unbounded); None when the call is bounded or the value is not a dict."""
    if not isinstance(timeout, dict):
        return None
    phases = [phase for phase in _PHASES if timeout.get(phase) is None]
    return phases if any(phase in phases for phase in _JUDGED) else None


def untimed_message(request: Any, phases: list[str], request_label: str,
                    location: Location) -> str:
    """The ``missing-timeout`` message: the call, the line, the unbounded phases."""
    file, line, function = location
    where = "an unknown line" if file is None else f"{file}:{line}" if line else file
    if file is not None and function:
        where += f" ({function})"
    if len(phases) == len(_PHASES):
        what = "no timeout at all"
    else:
        names = ", ".join(phases[:-1]) + (" and " if len(phases) > 1 else "") + phases[-1]
        bounded = ", ".join(
            f"{phase}={request.extensions['timeout'].get(phase)!r}" for phase in _PHASES
            if phase not in phases
        )
        what = f"no timeout for its {names} phases (only {bounded})"
    return (
        f"{request_label}: the call to {request.method} {request.url} at {where} had "
        f"{what}. {MISSING_TIMEOUT_HELP} See {DOCS}missing-timeout"
    )


@dataclass
class _HttpCall:
    wait_s: float = 0.0
    timeout_judged: bool = False  # the transport judged its timeouts (the fakes do not)


_http_call: contextvars.ContextVar[_HttpCall | None] = contextvars.ContextVar(
    "stallguard_http_call", default=None
)


def note_http_pool_wait(seconds: float) -> None:
    """Add ``seconds`` of pool wait to the httpx call being made (used by the fakes)."""
    call = _http_call.get()
    if call is not None:
        call.wait_s += seconds


def transport_judged_timeout() -> bool:
    """True inside an httpx call whose timeouts the transport watch has judged: then the
    fakes leave ``missing-timeout`` to it, so one call is never reported twice."""
    call = _http_call.get()
    return call is not None and call.timeout_judged


def _add_wait(started: float) -> None:
    note_http_pool_wait(real.perf_counter() - started)


class _Sent:
    """One request through a watched transport."""

    __slots__ = ("frame", "record", "request", "started", "stats", "token")

    def __init__(self, stats: Stats, request: Any, frame: FrameType) -> None:
        self.started = real.perf_counter()
        self.stats = stats
        self.request = request
        self.frame = frame
        self.record = _HttpCall()
        self.token: contextvars.Token[_HttpCall | None] | None = None


def _forget(sent: _Sent) -> None:
    """The call is over: later pool waits in this context are not its own."""
    if sent.token is not None:
        with contextlib.suppress(Exception):
            _http_call.reset(sent.token)
        sent.token = None


def _request_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return args[1] if len(args) > 1 else kwargs["request"]


class HttpxWatch:
    """Pool waits, timeouts and client creation of httpx (part of :class:`PoolWatch`)."""

    def __init__(self, core: WatchCore) -> None:
        self.core = core
        self.transports: weakref.WeakSet[Any] = weakref.WeakSet()
        self._users: dict[int, Location] = {}  # transport -> last user line that called it

    def install(self) -> None:
        core, hooks, watch = self.core, self.core.hooks, self
        a_link = core.patches.link(httpx.AsyncHTTPTransport, "handle_async_request")
        s_link = core.patches.link(httpx.HTTPTransport, "handle_request")

        @functools.wraps(a_link.next)
        async def handle_async_request(*args: Any, **kwargs: Any) -> Any:
            transport = args[0] if args else None
            if not core.on or hooks.disabled(TRANSPORT, transport):
                return await a_link.next(*args, **kwargs)
            sent = hooks.safely(LIBRARY, TRANSPORT, transport, watch._enter, sys._getframe(1),
                                args, kwargs)
            if sent is None:
                return await a_link.next(*args, **kwargs)
            if not hooks.disabled(TIMEOUTS, transport):
                hooks.safely(LIBRARY, TIMEOUTS, transport, watch._judge_timeout, sent)
            try:
                return await a_link.next(*args, **kwargs)
            except BaseException as exc:
                hooks.safely(LIBRARY, TRANSPORT, transport, watch._failed, sent, exc)
                raise
            finally:
                _forget(sent)
                hooks.safely(LIBRARY, TRANSPORT, transport, watch._leave, sent)

        @functools.wraps(s_link.next)
        def handle_request(*args: Any, **kwargs: Any) -> Any:
            transport = args[0] if args else None
            if not core.on or hooks.disabled(TRANSPORT, transport):
                return s_link.next(*args, **kwargs)
            sent = hooks.safely(LIBRARY, TRANSPORT, transport, watch._enter, sys._getframe(1),
                                args, kwargs)
            if sent is None:
                return s_link.next(*args, **kwargs)
            if not hooks.disabled(TIMEOUTS, transport):
                hooks.safely(LIBRARY, TIMEOUTS, transport, watch._judge_timeout, sent)
            try:
                return s_link.next(*args, **kwargs)
            except BaseException as exc:
                hooks.safely(LIBRARY, TRANSPORT, transport, watch._failed, sent, exc)
                raise
            finally:
                _forget(sent)
                hooks.safely(LIBRARY, TRANSPORT, transport, watch._leave, sent)

        core.patches.set(
            httpx.AsyncHTTPTransport, "handle_async_request", handle_async_request, a_link
        )
        core.patches.set(httpx.HTTPTransport, "handle_request", handle_request, s_link)
        for cls in (httpx.AsyncClient, httpx.Client):
            core.watch_init(cls, LIBRARY, "httpx client")
        try:
            self._install_waits()
        except Exception as exc:  # httpcore moved its private pool request
            hooks.failed(CORE_LIBRARY, WAIT, exc)

    def _install_waits(self) -> None:
        """The wait for a connection inside httpcore's pool: the private PoolRequest since
        httpcore 1.0.3, RequestStatus before (httpcore 0.17 under httpx 0.24, 1.0.0-1.0.2)."""
        from httpcore._async import connection_pool as a_pool
        from httpcore._sync import connection_pool as s_pool

        AsyncPoolRequest = getattr(a_pool, "AsyncPoolRequest", None) or a_pool.RequestStatus  # type: ignore[attr-defined]
        PoolRequest = getattr(s_pool, "PoolRequest", None) or s_pool.RequestStatus  # type: ignore[attr-defined]

        core, hooks = self.core, self.core.hooks
        a_wait = core.patches.link(AsyncPoolRequest, "wait_for_connection")
        s_wait = core.patches.link(PoolRequest, "wait_for_connection")

        @functools.wraps(a_wait.next)
        async def a_wait_for_connection(*args: Any, **kwargs: Any) -> Any:
            started = real.perf_counter()
            try:
                return await a_wait.next(*args, **kwargs)
            finally:
                if not hooks.disabled(WAIT):
                    hooks.safely(CORE_LIBRARY, WAIT, None, _add_wait, started)

        @functools.wraps(s_wait.next)
        def s_wait_for_connection(*args: Any, **kwargs: Any) -> Any:
            started = real.perf_counter()
            try:
                return s_wait.next(*args, **kwargs)
            finally:
                if not hooks.disabled(WAIT):
                    hooks.safely(CORE_LIBRARY, WAIT, None, _add_wait, started)

        core.patches.set(AsyncPoolRequest, "wait_for_connection", a_wait_for_connection, a_wait)
        core.patches.set(PoolRequest, "wait_for_connection", s_wait_for_connection, s_wait)

    def transport_user(self, transport: Any) -> Location | None:
        """The last user line that sent a request through ``transport``."""
        with self.core.lock:
            return self._users.get(id(transport))

    # -- bookkeeping (each step runs under HookGuard.safely) ----------------------------
    def _enter(self, frame: FrameType, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> _Sent:
        transport, request = args[0], _request_of(args, kwargs)
        core = self.core
        location = caller_location(frame)
        with core.lock:
            self.transports.add(transport)
            self._users[id(transport)] = location
        pool = getattr(transport, "_pool", None)
        stats = core.stat(pool if pool is not None else transport, "httpx pool", "httpx")
        limit = getattr(pool, "_max_connections", None)
        sent = _Sent(stats, request, frame)
        with core.lock:
            stats.size = limit if isinstance(limit, int) else 0
            stats.enter()
        sent.token = _http_call.set(sent.record)
        # A DB connection the same request holds idle now awaits this call.
        url = request.url
        core.outbound(request_info(), f"{request.method} {url.scheme}://"
                      f"{url.netloc.decode('ascii')}{url.path}")
        return sent

    def _judge_timeout(self, sent: _Sent) -> None:
        """``missing-timeout`` when a request's call can wait forever (read or pool
        unbounded); the test's own calls outside a request are not findings."""
        request = sent.request
        phases = unbounded_phases(request.extensions.get("timeout", {}))
        info = request_info() if phases is not None else None
        if phases is not None and info is not None:
            location = caller_location(sent.frame)
            url = request.url
            self.core.record(
                "missing-timeout", untimed_message(request, phases, info.request, location),
                location=location, request=info.request,
                call=f"{request.method} {url.scheme}://{url.netloc.decode('ascii')}",
                frame=sent.frame,
            )
        sent.record.timeout_judged = True

    def _failed(self, sent: _Sent, exc: BaseException) -> None:
        if not isinstance(exc, httpx.PoolTimeout):
            return
        core, stats, record, request = self.core, sent.stats, sent.record, sent.request
        with core.lock:
            stats.timeouts += 1
        info = request_info()
        if info is None:
            return
        core.record(
            "pool-exhaustion",
            f"{info.request}: the call to {request.method} {request.url} got PoolTimeout "
            f"after waiting {record.wait_s * 1000:.0f} ms for a connection of an httpx "
            f"pool of {stats.size}. {POOL_HELP} See {DOCS}pool-exhaustion",
            location=caller_location(sent.frame), request=info.request,
            duration_ms=record.wait_s * 1000, call=f"httpx {request.url.host}",
            frame=sent.frame,
        )

    def _leave(self, sent: _Sent) -> None:
        core, stats, request = self.core, sent.stats, sent.request
        wait_ms = sent.record.wait_s * 1000.0
        now = real.perf_counter()
        # The request's audit (issue 10): the call's pool wait, its io, its host.
        audit.http_call(request.url.host, sent.started, now, sent.record.wait_s)
        # The connection served the request from the end of the wait until the response
        # head arrived (httpx reads a plain call's body right after, on the same connection).
        work = max(now - sent.started - sent.record.wait_s, 0.0)
        with core.lock:
            stats.in_use -= 1
            stats.waits_ms.append(wait_ms)
            stats.work_s += work
        if wait_ms <= core.slot_wait_ms:
            return
        info = request_info()
        if info is None:
            return
        core.record(
            "pool-exhaustion",
            f"{info.request} waited {wait_ms:.0f} ms for a connection of an httpx pool of "
            f"{stats.size} to call {request.method} {request.url} {core.wait_bound()}. "
            f"{POOL_HELP} See {DOCS}pool-exhaustion",
            location=caller_location(sent.frame), request=info.request, duration_ms=wait_ms,
            call=f"httpx {request.url.host}", frame=sent.frame,
        )


# -- shrinking ----------------------------------------------------------------------------


def client_pools(client: httpx.AsyncClient | httpx.Client) -> list[Any]:
    """The httpcore connection pools behind a client (its transport and its mounts)."""
    transports: Iterable[Any] = [client._transport, *client._mounts.values()]
    pools = []
    for transport in transports:
        pool = getattr(transport, "_pool", None)
        if pool is not None and hasattr(pool, "_max_connections"):
            pools.append(pool)
    return pools


def limit_pool(pool: Any, n: int) -> None:
    pool._max_connections = n
    pool._max_keepalive_connections = min(pool._max_keepalive_connections, n)


def shrink_client(client: httpx.AsyncClient | httpx.Client, max_connections: int,
                  pool_timeout: float, undo: list[Any]) -> None:
    """Limit the client's pools and its pool timeout; appends the steps that restore it."""
    max_connections = check_size("max_connections", max_connections)
    pool_timeout = check_timeout("pool_timeout", pool_timeout)
    if not isinstance(client, (httpx.AsyncClient, httpx.Client)):
        raise TypeError(
            f"shrink_pools.httpx: give an httpx.AsyncClient or httpx.Client, got {client!r}"
        )
    pools = client_pools(client)
    if not pools:
        raise TypeError(
            f"shrink_pools.httpx: {client!r} has no httpcore connection pool (a custom or "
            "ASGI transport?); nothing to shrink"
        )
    for pool in pools:
        saved = (pool._max_connections, pool._max_keepalive_connections)
        limit_pool(pool, max_connections)

        def restore(pool: Any = pool, saved: tuple[int, int] = saved) -> None:
            pool._max_connections, pool._max_keepalive_connections = saved

        undo.append(restore)
    old_timeout = client.timeout
    client.timeout = httpx.Timeout(
        connect=old_timeout.connect, read=old_timeout.read, write=old_timeout.write,
        pool=pool_timeout,
    )

    def restore_timeout() -> None:
        client.timeout = old_timeout

    undo.append(restore_timeout)


def shrink_new_pools(patches: patching.Patches, hooks: HookGuard, n: int,
                     closed: Any) -> None:
    """Every httpcore pool created from now on gets ``max_connections=n``."""
    what = "httpcore pool creation (shrink)"
    for cls in (httpcore.AsyncConnectionPool, httpcore.ConnectionPool):
        link = patches.link(cls, "__init__")

        def body(args: tuple[Any, ...], kwargs: dict[str, Any], _link: Any = link,
                 _cls: type = cls) -> Any:
            result = _link.next(*args, **kwargs)
            if not closed() and not hooks.disabled(what, _cls):
                hooks.safely(CORE_LIBRARY, what, _cls, limit_pool, args[0], n)
            return result

        patches.set(cls, "__init__", same_signature(link.next, body), link)


# -- leaks --------------------------------------------------------------------------------


def stuck_connections(pool: Any) -> list[Any]:
    """Connections of an httpcore pool stuck CONNECTING or busy with no request on them.

    Reads httpcore 1.0 private state (``_requests``, the connections' ``info()``); call it
    when no request is in flight on the pool.
    """
    connections = list(getattr(pool, "connections", None) or [])
    if not connections:
        return []
    owned = {id(r.connection) for r in getattr(pool, "_requests", []) if r.connection}
    stuck = []
    for conn in connections:
        if id(conn) in owned:
            continue
        info = conn.info() if hasattr(conn, "info") else ""
        if info == "CONNECTING" or not (conn.is_idle() or conn.is_closed()):
            stuck.append(conn)
    return stuck


@dataclass(frozen=True)
class StuckPool:
    """An httpcore pool holding connections no request owns."""

    transport: Any
    max_connections: int | None
    connections: tuple[Any, ...]


def _pools_of(transports: Iterable[Any], clients: Iterable[Any]) -> list[tuple[Any, Any]]:
    every = list(transports)
    for client in clients:
        every.append(getattr(client, "_transport", None))
        every.extend(getattr(client, "_mounts", {}).values())
    seen: set[int] = set()
    pools = []
    for transport in every:
        pool = getattr(transport, "_pool", None)
        if pool is None or id(pool) in seen or not hasattr(pool, "_requests"):
            continue
        seen.add(id(pool))
        pools.append((transport, pool))
    return pools


def stuck_pools(transports: Iterable[Any] = (), clients: Iterable[Any] = ()
                ) -> list[StuckPool]:
    """The pools behind ``transports`` and ``clients`` that hold stuck connections."""
    found = []
    for transport, pool in _pools_of(transports, clients):
        stuck = stuck_connections(pool)
        if stuck:
            limit = getattr(pool, "_max_connections", None)
            found.append(StuckPool(transport, limit if isinstance(limit, int) else None,
                                   tuple(stuck)))
    return found
