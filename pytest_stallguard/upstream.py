"""Slow upstream services: respx fakes that behave like a real slow server, and real ones.

Plain respx answers at once, ignores the caller's timeouts and bypasses the connection
pool (it replaces ``AsyncConnectionPool.handle_async_request``), so a test with a mocked
payment API can never see the ``ReadTimeout`` or ``PoolTimeout`` production sees. The
fake upstreams here put those back:

- the side effect sleeps ``delay + jitter`` and raises ``httpcore.ReadTimeout`` at the
  caller's own read deadline (``ConnectTimeout``/``ConnectError`` for the connect knobs),
  which httpx maps to ``httpx.ReadTimeout`` etc. with the request attached, exactly as a
  real socket timeout would be mapped;
- each calling pool gets a slot count equal to its ``max_connections``; a call that finds
  every slot taken waits, and raises ``PoolTimeout`` when no slot frees within the pool
  timeout. As in httpcore, the pool timeout bounds time *without progress*: every waiter
  is woken when a slot frees and the losers wait again with a fresh timeout.

``SlowUpstreams`` is one respx router (the default httpcore mocker, so an in-process
``ASGITransport`` test client is never intercepted). Requests no fake matches pass
through to the network, so loopback servers (:func:`serve`) keep working.

:func:`serve` starts a real HTTP/1.1 server (keep-alive) on 127.0.0.1 in its own thread
with its own asyncio loop, usable from sync code and from inside any running loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json as jsonlib
import random
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import httpcore
import httpx
import respx
from respx.mocks import HTTPCoreMocker

from . import context, guard
from .model import DOCS
from .pools import note_http_pool_wait

__all__ = ["Call", "Server", "SlowUpstreams", "Upstream", "serve"]

# The httpcore pool (sync or async) whose handle_[async_]request is running: the side
# effect only receives the request, the pool's limits come from here.
_calling_pool: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "stallguard_calling_pool", default=None
)

MISSING_TIMEOUT_HELP = (
    "A call with no timeout waits as long as the upstream takes and holds a connection "
    "(and the request) all that time. Give the shared client a timeout, e.g. "
    "httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0)), and turn the timeout "
    "into a clean error response."
)


@dataclass
class Call:
    """One call an upstream fake or a served upstream received."""

    method: str
    url: str
    request: str | None  # the app request it was made for ("POST /checkout"), if any
    timeout: dict[str, float | None] = field(default_factory=dict)
    outcome: str = "pending"  # ok | failed | read-timeout | pool-timeout | connect-timeout
    #                           | connect-error | cancelled
    status: int | None = None
    started: float = 0.0
    ended: float | None = None
    httpx_request: httpx.Request | None = field(default=None, repr=False)

    @property
    def duration_ms(self) -> float | None:
        return None if self.ended is None else (self.ended - self.started) * 1000.0


class _Knobs:
    def __init__(
        self,
        *,
        delay: float,
        jitter: float,
        status: int,
        json: Any,
        fail_rate: float,
        fail_status: int,
        seed: int | None,
    ) -> None:
        for name, value in (("delay", delay), ("jitter", jitter)):
            if value < 0:
                raise ValueError(
                    f"slow_upstream: {name}={value!r} is not valid; give seconds >= 0"
                )
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError(
                f"slow_upstream: fail_rate={fail_rate!r} is not valid; give a fraction "
                "from 0.0 (never fail) to 1.0 (always fail)"
            )
        self.delay = delay
        self.jitter = jitter
        self.status = status
        self.json = json
        self.fail_rate = fail_rate
        self.fail_status = fail_status
        self._random = random.Random(seed)
        self._random_lock = threading.Lock()

    def draw(self) -> tuple[float, bool]:
        """(this call's delay, whether it fails)."""
        with self._random_lock:
            extra = self._random.uniform(0.0, self.jitter) if self.jitter else 0.0
            failed = self.fail_rate > 0 and self._random.random() < self.fail_rate
        return self.delay + extra, failed

    def chance(self, rate: float) -> bool:
        with self._random_lock:
            return rate >= 1.0 or (rate > 0 and self._random.random() < rate)

    def body(self, failed: bool) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        if failed:
            data = jsonlib.dumps({"detail": "upstream failure (stallguard fail_rate)"}).encode()
            return self.fail_status, data, [(b"content-type", b"application/json")]
        if self.json is None:
            return self.status, b"", []
        return (
            self.status,
            jsonlib.dumps(self.json).encode(),
            [(b"content-type", b"application/json")],
        )


class _Counters:
    """In-flight, max in flight and the call log, shared by fakes and served upstreams."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[Call] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.timed_out = 0
        self.cancelled = 0
        self.untimed = 0

    def begin(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def end(self, call: Call, outcome: str, status: int | None = None) -> None:
        with self._lock:
            call.outcome = outcome
            call.status = status
            call.ended = context.perf_counter()
            if outcome.endswith("timeout"):
                self.timed_out += 1
            elif outcome == "cancelled":
                self.cancelled += 1


class _Recorded:
    """What a test reads from a fake or a served upstream; both keep a ``_Counters``."""

    _counters: _Counters

    @property
    def calls(self) -> list[Call]:
        return list(self._counters.calls)

    @property
    def max_in_flight(self) -> int:
        return self._counters.max_in_flight

    @property
    def in_flight(self) -> int:
        return self._counters.in_flight

    @property
    def cancelled(self) -> int:
        """Calls given up before the answer (cancelled by the caller, or the client left)."""
        return self._counters.cancelled


# -- pool slots ---------------------------------------------------------------------------


_S = TypeVar("_S")


class _AsyncSlots:
    """The slots of one async pool, with httpcore's wake-everyone pool-timeout semantics."""

    def __init__(self) -> None:
        self.in_use = 0
        self._waiters: list[anyio.Event] = []

    async def acquire(self, limit: int, timeout: float | None) -> None:
        while self.in_use >= limit:
            event = anyio.Event()
            self._waiters.append(event)
            try:
                with anyio.move_on_after(float("inf") if timeout is None else timeout) as scope:
                    await event.wait()
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(event)
            if scope.cancelled_caught:
                raise httpcore.PoolTimeout("timed out waiting for a connection from the pool")
        self.in_use += 1

    def release(self) -> None:
        self.in_use -= 1
        waiters, self._waiters = self._waiters, []
        for event in waiters:
            event.set()


class _SyncSlots:
    def __init__(self) -> None:
        self.in_use = 0
        self._cond = threading.Condition()

    def acquire(self, limit: int, timeout: float | None) -> None:
        with self._cond:
            while self.in_use >= limit:
                if not self._cond.wait(timeout) and self.in_use >= limit:
                    raise httpcore.PoolTimeout("timed out waiting for a connection from the pool")
            self.in_use += 1

    def release(self) -> None:
        with self._cond:
            self.in_use -= 1
            self._cond.notify_all()


def _pool_limit(pool: object | None) -> int | None:
    limit = getattr(pool, "_max_connections", None)
    return limit if isinstance(limit, int) else None


# -- the fakes ----------------------------------------------------------------------------


class Upstream(_Recorded):
    """One fake upstream service at ``base_url``; see :meth:`SlowUpstreams.__call__`."""

    def __init__(
        self,
        owner: SlowUpstreams,
        base_url: str,
        knobs: _Knobs,
        *,
        connect_error: bool | float,
        connect_delay: float,
    ) -> None:
        url = httpx.URL(base_url)
        if not url.scheme or not url.host:
            raise ValueError(
                f"slow_upstream({base_url!r}): give an absolute URL like 'https://payments.example'"
            )
        self.base_url = base_url
        self._scheme = url.scheme
        self._host = url.host
        self._port = url.port
        self._path = url.path.rstrip("/")
        self._owner = owner
        self._knobs = knobs
        self._connect_error = float(connect_error)
        self._connect_delay = connect_delay
        self._counters = _Counters()

    # -- what the test reads (calls, in flight, cancelled: see _Recorded) ---------------
    @property
    def timed_out(self) -> int:
        return self._counters.timed_out

    @property
    def untimed(self) -> int:
        return self._counters.untimed

    def __repr__(self) -> str:
        return f"<Upstream {self.base_url} calls={len(self._counters.calls)}>"

    # -- matching and serving ----------------------------------------------------------
    def matches(self, url: httpx.URL) -> bool:
        if url.scheme != self._scheme or url.host != self._host or url.port != self._port:
            return False
        path = url.path
        return not self._path or path == self._path or path.startswith(self._path + "/")

    def _begin(self, request: httpx.Request) -> tuple[Call, dict[str, float | None]]:
        raw = request.extensions.get("timeout")
        timeout: dict[str, float | None] = dict(raw) if isinstance(raw, dict) else {}
        info = context.info_of(contextvars.copy_context())
        call = Call(
            method=request.method,
            url=str(request.url),
            request=None if info is None else info.request,
            timeout=timeout,
            started=context.perf_counter(),
            httpx_request=request,
        )
        self._counters.begin(call)
        if all(v is None for v in timeout.values()):
            with self._counters._lock:
                self._counters.untimed += 1
            active = guard.active()
            if active is not None and info is not None:
                active.record(
                    "missing-timeout",
                    f"The call to {request.method} {request.url} had no timeout at all "
                    f"(during {info.request}). {MISSING_TIMEOUT_HELP} "
                    f"See {DOCS}missing-timeout",
                    frame=sys._getframe(1),
                    request=info.request,
                    call=f"{request.method} {self.base_url}",
                )
        return call, timeout

    def _response(self, request: httpx.Request, call: Call, failed: bool) -> httpx.Response:
        status, body, headers = self._knobs.body(failed)
        self._counters.end(call, "failed" if failed else "ok", status)
        return httpx.Response(status, headers=headers, content=body, request=request)

    async def _serve_async(self, request: httpx.Request, pool: object | None) -> httpx.Response:
        call, timeout = self._begin(request)
        delay, failed = self._knobs.draw()
        slots = self._owner._async_slots(pool)
        limit = _pool_limit(pool)
        acquired = False
        try:
            if slots is not None and limit is not None:
                waiting = context.perf_counter()
                try:
                    await slots.acquire(limit, timeout.get("pool"))
                except httpcore.PoolTimeout:
                    self._counters.end(call, "pool-timeout")
                    raise
                finally:
                    note_http_pool_wait(context.perf_counter() - waiting)
                acquired = True
            self._counters.enter()
            try:
                await self._connect_async(call, timeout)
                read = timeout.get("read")
                with anyio.move_on_after(float("inf") if read is None else read) as scope:
                    await anyio.sleep(delay)
                if scope.cancelled_caught:
                    self._counters.end(call, "read-timeout")
                    raise httpcore.ReadTimeout("timed out")
                return self._response(request, call, failed)
            finally:
                self._counters.leave()
        except anyio.get_cancelled_exc_class():
            self._counters.end(call, "cancelled")
            raise
        finally:
            if acquired and slots is not None:
                slots.release()

    async def _connect_async(self, call: Call, timeout: dict[str, float | None]) -> None:
        connect = timeout.get("connect")
        if self._connect_delay:
            if connect is not None and self._connect_delay > connect:
                await anyio.sleep(connect)
                self._counters.end(call, "connect-timeout")
                raise httpcore.ConnectTimeout("timed out")
            await anyio.sleep(self._connect_delay)
        if self._connect_error and self._knobs.chance(self._connect_error):
            self._counters.end(call, "connect-error")
            raise httpcore.ConnectError("[Errno 111] Connection refused (stallguard fake)")

    def _serve_sync(self, request: httpx.Request, pool: object | None) -> httpx.Response:
        call, timeout = self._begin(request)
        delay, failed = self._knobs.draw()
        slots = self._owner._sync_slots(pool)
        limit = _pool_limit(pool)
        if slots is not None and limit is not None:
            waiting = context.perf_counter()
            try:
                slots.acquire(limit, timeout.get("pool"))
            except httpcore.PoolTimeout:
                self._counters.end(call, "pool-timeout")
                raise
            finally:
                note_http_pool_wait(context.perf_counter() - waiting)
        self._counters.enter()
        try:
            connect = timeout.get("connect")
            if self._connect_delay:
                if connect is not None and self._connect_delay > connect:
                    context.real_sleep(connect)
                    self._counters.end(call, "connect-timeout")
                    raise httpcore.ConnectTimeout("timed out")
                context.real_sleep(self._connect_delay)
            if self._connect_error and self._knobs.chance(self._connect_error):
                self._counters.end(call, "connect-error")
                raise httpcore.ConnectError("[Errno 111] Connection refused (stallguard fake)")
            read = timeout.get("read")
            if read is not None and delay > read:
                context.real_sleep(read)
                self._counters.end(call, "read-timeout")
                raise httpcore.ReadTimeout("timed out")
            context.real_sleep(delay)
            return self._response(request, call, failed)
        finally:
            self._counters.leave()
            if slots is not None and limit is not None:
                slots.release()


def _wrap_pool_method(original: Callable[..., Any], is_async: bool) -> Callable[..., Any]:
    if is_async:

        async def handle_async_request(self: object, *args: Any, **kwargs: Any) -> Any:
            token = _calling_pool.set(self)
            try:
                return await original(self, *args, **kwargs)
            finally:
                _calling_pool.reset(token)

        handle_async_request.__stallguard__ = True  # type: ignore[attr-defined]
        return handle_async_request

    def handle_request(self: object, *args: Any, **kwargs: Any) -> Any:
        token = _calling_pool.set(self)
        try:
            return original(self, *args, **kwargs)
        finally:
            _calling_pool.reset(token)

    handle_request.__stallguard__ = True  # type: ignore[attr-defined]
    return handle_request


class SlowUpstreams:
    """Factory of slow fake upstreams, all served by one respx router (the fixture object).

    Construct it anywhere (no loop needed); the router starts on the first fake and
    :meth:`close` (sync, idempotent) stops it, restores every patch and stops every
    server started by :meth:`serve`.
    """

    def __init__(self) -> None:
        self._upstreams: list[Upstream] = []
        self._servers: list[Server] = []
        self._router: respx.MockRouter | None = None
        self._patched: list[tuple[type, str, Any, Any]] = []
        self._aslots: weakref.WeakKeyDictionary[object, _AsyncSlots] = weakref.WeakKeyDictionary()
        self._sslots: weakref.WeakKeyDictionary[object, _SyncSlots] = weakref.WeakKeyDictionary()
        self._slots_lock = threading.Lock()

    def __call__(
        self,
        base_url: str,
        *,
        delay: float = 0.0,
        jitter: float = 0.0,
        status: int = 200,
        json: Any = None,
        fail_rate: float = 0.0,
        fail_status: int = 503,
        connect_error: bool | float = False,
        connect_delay: float = 0.0,
        seed: int | None = None,
    ) -> Upstream:
        """A fake upstream at ``base_url`` (scheme, host, port and path prefix).

        ``delay`` (+ uniform ``jitter``) seconds until the response; ``fail_rate`` of the
        calls get ``fail_status``; ``connect_error`` (True, or a rate) raises ConnectError;
        ``connect_delay`` longer than the caller's connect timeout raises ConnectTimeout.
        """
        knobs = _Knobs(
            delay=delay,
            jitter=jitter,
            status=status,
            json=json,
            fail_rate=fail_rate,
            fail_status=fail_status,
            seed=seed,
        )
        upstream = Upstream(
            self, base_url, knobs, connect_error=connect_error, connect_delay=connect_delay
        )
        self._start()
        # Newest first: a more specific fake registered later wins.
        self._upstreams.insert(0, upstream)
        return upstream

    def serve(
        self,
        *,
        delay: float = 0.0,
        jitter: float = 0.0,
        status: int = 200,
        json: Any = None,
        fail_rate: float = 0.0,
        fail_status: int = 503,
        seed: int | None = None,
    ) -> Server:
        """A real HTTP server on 127.0.0.1 (see :func:`serve`), stopped by :meth:`close`."""
        server = serve(
            delay=delay,
            jitter=jitter,
            status=status,
            json=json,
            fail_rate=fail_rate,
            fail_status=fail_status,
            seed=seed,
        )
        self._servers.append(server)
        return server

    # -- router ------------------------------------------------------------------------
    def _start(self) -> None:
        if self._router is not None:
            return
        router = respx.mock(assert_all_called=False, assert_all_mocked=True)
        router.route().mock(side_effect=self._side_effect)
        router.start()
        self._router = router
        try:
            for cls, name, is_async in (
                (httpcore.AsyncConnectionPool, "handle_async_request", True),
                (httpcore.ConnectionPool, "handle_request", False),
            ):
                current = cls.__dict__[name]
                wrapper = _wrap_pool_method(current, is_async)
                setattr(cls, name, wrapper)
                self._patched.append((cls, name, current, wrapper))
        except BaseException:
            self.close()
            raise

    def _side_effect(self, request: httpx.Request) -> Any:
        for upstream in self._upstreams:
            if upstream.matches(request.url):
                pool = _calling_pool.get()
                if _is_async_call():
                    return upstream._serve_async(request, pool)
                return upstream._serve_sync(request, pool)
        # Not ours: pass through to the network, unless another respx router comes after
        # this one (then let it answer: returning None makes this router "not mocked").
        routers = HTTPCoreMocker.routers
        if routers and routers[-1] is not self._router:
            return None
        return request

    def _async_slots(self, pool: object | None) -> _AsyncSlots | None:
        return self._slots(self._aslots, _AsyncSlots, pool)

    def _sync_slots(self, pool: object | None) -> _SyncSlots | None:
        return self._slots(self._sslots, _SyncSlots, pool)

    def _slots(
        self,
        table: weakref.WeakKeyDictionary[object, _S],
        make: Callable[[], _S],
        pool: object | None,
    ) -> _S | None:
        """The slot counter of the caller's pool (one per pool, made on first use)."""
        if pool is None:
            return None
        with self._slots_lock:
            slots = table.get(pool)
            if slots is None:
                slots = table[pool] = make()
            return slots

    @property
    def upstreams(self) -> list[Upstream]:
        return list(self._upstreams)

    @property
    def servers(self) -> list[Server]:
        return list(self._servers)

    def close(self) -> None:
        """Stop the router, restore the pool methods, stop every served upstream."""
        errors: list[BaseException] = []
        while self._patched:
            cls, name, original, wrapper = self._patched.pop()
            if cls.__dict__.get(name) is wrapper:
                setattr(cls, name, original)
        if self._router is not None:
            router, self._router = self._router, None
            try:
                router.stop(quiet=True)
            except BaseException as exc:  # keep closing the servers
                errors.append(exc)
        while self._servers:
            try:
                self._servers.pop().close()
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    async def aclose(self) -> None:
        self.close()

    def __enter__(self) -> SlowUpstreams:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_async_call() -> bool:
    """Whether the httpcore call being mocked is the async one (set by our pool wrapper)."""
    pool = _calling_pool.get()
    if pool is not None:
        return isinstance(pool, httpcore.AsyncConnectionPool)
    # A connection or proxy called directly: look at who is awaiting us.
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "amock":
            return True
        if frame.f_code.co_name == "mock":
            return False
        frame = frame.f_back  # type: ignore[assignment]
    return False


# -- real servers -------------------------------------------------------------------------


class Server(_Recorded):
    """A real HTTP/1.1 server on 127.0.0.1 with keep-alive, in its own thread and loop."""

    def __init__(self, knobs: _Knobs) -> None:
        self._knobs = knobs
        self._counters = _Counters()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self._thread = threading.Thread(
            target=self._run, name="stallguard-upstream-server", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """Client connections open right now."""
        return len(self._writers)

    def __repr__(self) -> str:
        return f"<Server {self.url} calls={len(self._counters.calls)}>"

    def _start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        if not self._started.wait(timeout):
            self.close()
            raise RuntimeError(f"stallguard: the upstream server did not start in {timeout} s")
        if self._error is not None:
            raise RuntimeError(f"stallguard: the upstream server failed: {self._error!r}")

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to the starter, or lost at close
            self._error = exc
        finally:
            self._started.set()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for writer in list(self._writers):
                writer.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=2.0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 2.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            while True:
                head = await _read_head(reader)
                if head is None:
                    return
                method, target, headers = head
                await _read_body(reader, headers)
                call = Call(
                    method=method,
                    url=self.url + target,
                    request=None,
                    started=context.perf_counter(),
                )
                self._counters.begin(call)
                self._counters.enter()
                try:
                    delay, failed = self._knobs.draw()
                    if delay:
                        await asyncio.sleep(delay)
                    if reader.at_eof():  # the client went away while we were slow
                        self._counters.end(call, "cancelled")
                        return
                    status, body, extra = self._knobs.body(failed)
                    close = headers.get("connection", "").lower() == "close"
                    lines = [
                        f"HTTP/1.1 {status} {_reason(status)}",
                        f"content-length: {len(body)}",
                        "connection: close" if close else "connection: keep-alive",
                    ]
                    lines += [f"{k.decode()}: {v.decode()}" for k, v in extra]
                    # Recorded before the write: the client may read the response (and the
                    # test look at .calls) before drain() returns here.
                    self._counters.end(call, "failed" if failed else "ok", status)
                    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
                    await writer.drain()
                finally:
                    self._counters.leave()
                if close:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        except asyncio.CancelledError:
            return
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the server and join its thread (bounded by ``timeout``); idempotent."""
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # loop closed meanwhile
                loop.call_soon_threadsafe(stop.set)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _read_head(
    reader: asyncio.StreamReader,
) -> tuple[str, str, dict[str, str]] | None:
    line = await reader.readline()
    if not line:
        return None
    parts = line.decode("latin-1").split()
    if len(parts) != 3:
        raise ValueError(f"bad request line {line!r}")
    headers: dict[str, str] = {}
    while True:
        raw = await reader.readline()
        if not raw:
            raise asyncio.IncompleteReadError(raw, None)
        if raw in (b"\r\n", b"\n"):
            break
        name, _, value = raw.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        chunks: list[bytes] = []
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
    length = int(headers.get("content-length", "0") or "0")
    return await reader.readexactly(length) if length else b""


def _reason(status: int) -> str:
    with contextlib.suppress(ValueError):
        from http import HTTPStatus

        return HTTPStatus(status).phrase
    return "Unknown"


def serve(
    *,
    delay: float = 0.0,
    jitter: float = 0.0,
    status: int = 200,
    json: Any = None,
    fail_rate: float = 0.0,
    fail_status: int = 503,
    seed: int | None = None,
) -> Server:
    """Start a real HTTP/1.1 server on 127.0.0.1 (ephemeral port) and return it running.

    Each request is answered after ``delay`` (+ uniform ``jitter``) seconds with ``status``
    and ``json``; ``fail_rate`` of them get ``fail_status``. Keep-alive is honoured, so
    httpx pools keep warm connections to it. Callable from sync code and from inside a
    running asyncio or trio loop (it has its own thread and loop); stop it with
    :meth:`Server.close` (or use it as a context manager).
    """
    knobs = _Knobs(
        delay=delay,
        jitter=jitter,
        status=status,
        json=json,
        fail_rate=fail_rate,
        fail_status=fail_status,
        seed=seed,
    )
    server = Server(knobs)
    server._start()
    return server


@contextlib.contextmanager
def slow_upstreams() -> Iterator[SlowUpstreams]:
    """``with slow_upstreams() as up: ...``: the factory, closed on the way out."""
    factory = SlowUpstreams()
    try:
        yield factory
    finally:
        factory.close()
