"""The respx fakes: ``slow_upstream("https://payments.example", delay=2.0)``.

Plain respx answers at once, ignores the caller's timeouts and bypasses the connection
pool (it replaces ``AsyncConnectionPool.handle_async_request``), so a test with a mocked
payment API can never see the ``ReadTimeout`` or ``PoolTimeout`` production sees. The
fakes here put those back:

- the side effect sleeps ``delay + jitter`` and raises ``httpcore.ReadTimeout`` at the
  caller's own read deadline (``ConnectTimeout``/``ConnectError`` for the connect knobs),
  which httpx maps to ``httpx.ReadTimeout`` etc. with the request attached, exactly as a
  real socket timeout would be mapped;
- each calling pool gets a slot count equal to its ``max_connections``; a call that finds
  every slot taken waits, and raises ``PoolTimeout`` when no slot frees within the pool
  timeout. As in httpcore, the pool timeout bounds time *without progress*: every waiter
  is woken when a slot frees and the losers wait again with a fresh timeout.

:class:`SlowUpstreams` is one respx router (the default httpcore mocker, so an in-process
``ASGITransport`` test client is never intercepted). Requests no fake matches pass
through to the network, so loopback servers (:mod:`.server`) keep working. The calling
pool is known through a wrapper on the httpcore pool classes, installed through
:mod:`..patching` (owner ``"slow upstream"``) and removed by :meth:`SlowUpstreams.close`.

Our bookkeeping (call log, slot accounting, matching, the missing-timeout finding) never
reaches the app: when it fails, :func:`patching.hook_failed` notes it and the app gets the
fake's response, or the timeout the fake models, as it would without that bookkeeping.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import anyio
import httpcore
import httpx
import respx
from respx.mocks import HTTPCoreMocker

from .. import context, guard, patching
from ..clock import real
from ..pools import note_http_pool_wait
from ..pools.common import caller_location
from ..pools.httpx import (
    MISSING_TIMEOUT_HELP,
    transport_judged_timeout,
    unbounded_phases,
    untimed_message,
)
from .calls import OWNER, Call, CallLog, Knobs, Recorded, quietly
from .calls import failed as _failed
from .server import Server, serve

__all__ = ["MISSING_TIMEOUT_HELP", "SlowUpstreams", "Upstream", "slow_upstreams"]

# A slot wait with no pool timeout (the caller's ``pool=None``) still ends: after this
# long (real clock) the fake gives up its slot accounting for that pool, notes it, and
# lets the call through. Slots free as soon as the calls holding them end, so only a
# bug of ours can get here.
SLOT_WAIT_BOUND_S = 120.0
_RECHECK_S = 1.0  # how often such a wait looks at the bound

# The httpcore pool (sync or async) whose handle_[async_]request is running: the side
# effect only receives the request, the pool's limits come from here.
_calling_pool: contextvars.ContextVar[object | None] = contextvars.ContextVar(
    "stallguard_calling_pool", default=None
)


class _SlotWaitTooLong(RuntimeError):
    pass


def _pool_timeout() -> httpcore.PoolTimeout:
    return httpcore.PoolTimeout("timed out waiting for a connection from the pool")


# -- pool slots ---------------------------------------------------------------------------


class _AsyncSlots:
    """The slots of one async pool, with httpcore's wake-everyone pool-timeout semantics.

    ``off`` (set when our accounting failed for this pool): no limit any more.
    """

    def __init__(self) -> None:
        self.in_use = 0
        self.off = False
        self._waiters: list[anyio.Event] = []

    async def acquire(self, limit: int, timeout: float | None) -> bool:
        """Take a slot (True), or False when the accounting is off for this pool."""
        started = real.monotonic()
        while not self.off and self.in_use >= limit:
            event = anyio.Event()
            self._waiters.append(event)
            try:
                if timeout is None:
                    if real.monotonic() - started > SLOT_WAIT_BOUND_S:
                        raise _SlotWaitTooLong(
                            f"no slot freed in {SLOT_WAIT_BOUND_S} s (no pool timeout given)"
                        )
                    with anyio.move_on_after(_RECHECK_S):
                        await event.wait()
                else:
                    with anyio.move_on_after(timeout) as scope:
                        await event.wait()
                    if scope.cancelled_caught:
                        raise _pool_timeout()
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(event)
        if self.off:
            return False
        self.in_use += 1
        return True

    def release(self) -> None:
        self.in_use -= 1
        self._wake()

    def turn_off(self) -> None:
        self.off = True
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for event in waiters:
            event.set()


class _SyncSlots:
    def __init__(self) -> None:
        self.in_use = 0
        self.off = False
        self._cond = threading.Condition()

    def acquire(self, limit: int, timeout: float | None) -> bool:
        started = real.monotonic()
        with self._cond:
            while not self.off and self.in_use >= limit:
                if timeout is None:
                    if real.monotonic() - started > SLOT_WAIT_BOUND_S:
                        raise _SlotWaitTooLong(
                            f"no slot freed in {SLOT_WAIT_BOUND_S} s (no pool timeout given)"
                        )
                    self._cond.wait(_RECHECK_S)
                elif not self._cond.wait(timeout) and not self.off and self.in_use >= limit:
                    raise _pool_timeout()
            if self.off:
                return False
            self.in_use += 1
            return True

    def release(self) -> None:
        with self._cond:
            self.in_use -= 1
            self._cond.notify_all()

    def turn_off(self) -> None:
        with self._cond:
            self.off = True
            self._cond.notify_all()


def _pool_limit(pool: object | None) -> int | None:
    limit = getattr(pool, "_max_connections", None)  # httpcore's own, private
    return limit if isinstance(limit, int) else None


# -- the fakes ----------------------------------------------------------------------------


class Upstream(Recorded):
    """One fake upstream service at ``base_url``; see :meth:`SlowUpstreams.__call__`."""

    def __init__(
        self,
        owner: SlowUpstreams,
        base_url: str,
        knobs: Knobs,
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
        self._log = CallLog()

    # -- what the test reads (calls, in flight, cancelled: see Recorded) ---------------
    @property
    def timed_out(self) -> int:
        return self._log.timed_out

    @property
    def untimed(self) -> int:
        return self._log.untimed

    def __repr__(self) -> str:
        return f"<Upstream {self.base_url} calls={len(self._log.calls)}>"

    # -- matching ----------------------------------------------------------------------
    def matches(self, url: httpx.URL) -> bool:
        if url.scheme != self._scheme or url.host != self._host or url.port != self._port:
            return False
        path = url.path
        return not self._path or path == self._path or path.startswith(self._path + "/")

    # -- bookkeeping: each step notes its own failure and never raises --------------------
    def _begin(self, request: httpx.Request) -> tuple[Call, dict[str, float | None]]:
        raw = request.extensions.get("timeout")
        timeout: dict[str, float | None] = dict(raw) if isinstance(raw, dict) else {}
        call = Call(
            method=request.method,
            url=str(request.url),
            request=None,
            timeout=timeout,
            started=real.perf_counter(),
            httpx_request=request,
        )
        try:
            info = context.info_of(contextvars.copy_context())
            call.request = None if info is None else info.request
            self._log.begin(call)
            if all(v is None for v in timeout.values()):
                self._log.note_untimed()
            self._missing_timeout(request, info)
        except Exception as exc:
            _failed("the call log", exc)
        return call, timeout

    def _missing_timeout(self, request: httpx.Request, info: context.RequestInfo | None) -> None:
        """Only when no transport watch judged this call (a bare :class:`Guard`): the
        transport owns ``missing-timeout`` for every call it sees, fakes included."""
        active = guard.active()
        if active is None or info is None or transport_judged_timeout():
            return
        try:
            phases = unbounded_phases(request.extensions.get("timeout", {}))
            if phases is None:
                return
            frame = sys._getframe(1)
            location = caller_location(frame)
            active.record(
                "missing-timeout",
                untimed_message(request, phases, info.request, location),
                frame=frame,
                location=location,
                request=info.request,
                call=f"{request.method} {self.base_url}",
            )
        except Exception as exc:
            _failed("calls without a timeout", exc)

    def _end(self, call: Call, outcome: str, status: int | None = None) -> None:
        quietly("the call log", self._log.end, call, outcome, status)

    def _enter(self) -> None:
        quietly("the call log", self._log.enter)

    def _leave(self) -> None:
        quietly("the call log", self._log.leave)

    def _response(self, request: httpx.Request, call: Call, failed: bool) -> httpx.Response:
        status, body, headers = self._knobs.body(failed)
        self._end(call, "failed" if failed else "ok", status)
        return httpx.Response(status, headers=headers, content=body, request=request)

    # -- async --------------------------------------------------------------------------
    async def _serve_async(self, request: httpx.Request, pool: object | None) -> httpx.Response:
        call, timeout = self._begin(request)
        delay, failed = self._knobs.draw()
        slots = self._owner._async_slots(pool)
        acquired = False
        try:
            if slots is not None:
                acquired = await self._acquire_async(slots, pool, call, timeout.get("pool"))
            self._enter()
            try:
                await self._connect_async(call, timeout)
                read = timeout.get("read")
                with anyio.move_on_after(float("inf") if read is None else read) as scope:
                    await anyio.sleep(delay)
                if scope.cancelled_caught:
                    self._end(call, "read-timeout")
                    raise httpcore.ReadTimeout("timed out")
                return self._response(request, call, failed)
            finally:
                self._leave()
        except anyio.get_cancelled_exc_class():
            self._end(call, "cancelled")
            raise
        finally:
            if acquired and slots is not None:
                try:
                    slots.release()
                except Exception as exc:
                    _failed("pool slots", exc)
                    slots.turn_off()

    async def _acquire_async(
        self, slots: _AsyncSlots, pool: object | None, call: Call, timeout: float | None
    ) -> bool:
        """A slot of the caller's pool (True), or no accounting (False); raises only the
        ``PoolTimeout`` the real pool would raise."""
        limit = _pool_limit(pool)
        if limit is None:
            return False
        waiting = real.perf_counter()
        try:
            return await slots.acquire(limit, timeout)
        except httpcore.PoolTimeout:
            self._end(call, "pool-timeout")
            raise
        except Exception as exc:
            _failed("pool slots", exc)
            slots.turn_off()
            return False
        finally:
            _note_pool_wait(real.perf_counter() - waiting)

    async def _connect_async(self, call: Call, timeout: dict[str, float | None]) -> None:
        connect = timeout.get("connect")
        if self._connect_delay:
            if connect is not None and self._connect_delay > connect:
                await anyio.sleep(connect)
                self._end(call, "connect-timeout")
                raise httpcore.ConnectTimeout("timed out")
            await anyio.sleep(self._connect_delay)
        if self._connect_error and self._knobs.chance(self._connect_error):
            self._end(call, "connect-error")
            raise httpcore.ConnectError("[Errno 111] Connection refused (stallguard fake)")

    # -- sync ---------------------------------------------------------------------------
    def _serve_sync(self, request: httpx.Request, pool: object | None) -> httpx.Response:
        call, timeout = self._begin(request)
        delay, failed = self._knobs.draw()
        slots = self._owner._sync_slots(pool)
        acquired = False
        if slots is not None:
            acquired = self._acquire_sync(slots, pool, call, timeout.get("pool"))
        self._enter()
        try:
            connect = timeout.get("connect")
            if self._connect_delay:
                if connect is not None and self._connect_delay > connect:
                    real.sleep(connect)
                    self._end(call, "connect-timeout")
                    raise httpcore.ConnectTimeout("timed out")
                real.sleep(self._connect_delay)
            if self._connect_error and self._knobs.chance(self._connect_error):
                self._end(call, "connect-error")
                raise httpcore.ConnectError("[Errno 111] Connection refused (stallguard fake)")
            read = timeout.get("read")
            if read is not None and delay > read:
                real.sleep(read)
                self._end(call, "read-timeout")
                raise httpcore.ReadTimeout("timed out")
            real.sleep(delay)
            return self._response(request, call, failed)
        finally:
            self._leave()
            if acquired and slots is not None:
                try:
                    slots.release()
                except Exception as exc:
                    _failed("pool slots", exc)
                    slots.turn_off()

    def _acquire_sync(
        self, slots: _SyncSlots, pool: object | None, call: Call, timeout: float | None
    ) -> bool:
        limit = _pool_limit(pool)
        if limit is None:
            return False
        waiting = real.perf_counter()
        try:
            return slots.acquire(limit, timeout)
        except httpcore.PoolTimeout:
            self._end(call, "pool-timeout")
            raise
        except Exception as exc:
            _failed("pool slots", exc)
            slots.turn_off()
            return False
        finally:
            _note_pool_wait(real.perf_counter() - waiting)


def _note_pool_wait(seconds: float) -> None:
    quietly("pool waits", note_http_pool_wait, seconds)


# -- the pool wrappers ----------------------------------------------------------------------


def _async_pool_method(link: patching.Link) -> Callable[..., Any]:
    @functools.wraps(link.next)
    async def handle_async_request(self: object, *args: Any, **kwargs: Any) -> Any:
        token = _enter_pool(self)
        try:
            return await link.next(self, *args, **kwargs)
        finally:
            _leave_pool(token)

    return handle_async_request


def _sync_pool_method(link: patching.Link) -> Callable[..., Any]:
    @functools.wraps(link.next)
    def handle_request(self: object, *args: Any, **kwargs: Any) -> Any:
        token = _enter_pool(self)
        try:
            return link.next(self, *args, **kwargs)
        finally:
            _leave_pool(token)

    return handle_request


def _enter_pool(pool: object) -> contextvars.Token[object | None] | None:
    try:
        return _calling_pool.set(pool)
    except Exception as exc:
        _failed("the calling pool", exc)
        return None


def _leave_pool(token: contextvars.Token[object | None] | None) -> None:
    if token is None:
        return
    try:
        _calling_pool.reset(token)
    except Exception as exc:
        _failed("the calling pool", exc)


_S = TypeVar("_S", _AsyncSlots, _SyncSlots)


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
        self._patches = patching.Patches(OWNER)  # the pool wrappers
        self._router_patch = patching.Patches(OWNER)  # the respx router, started
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
        knobs = Knobs(
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
        """A real HTTP server on 127.0.0.1 (see :func:`.server.serve`), stopped by
        :meth:`close`."""
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
        # Live and restorable like every patch of ours (restore_all on an interrupt); an
        # older owner than the wrappers, so they come off first and respx then puts back
        # exactly what it replaced.
        self._router_patch.undo(
            "respx router", functools.partial(router.stop, quiet=True), target="respx"
        )
        try:
            # Above respx's own patch of the same methods: ours runs first and calls it.
            self._patches.wrap(
                httpcore.AsyncConnectionPool, "handle_async_request", _async_pool_method
            )
            self._patches.wrap(httpcore.ConnectionPool, "handle_request", _sync_pool_method)
        except BaseException:
            self.close()
            raise

    def _side_effect(self, request: httpx.Request) -> Any:
        upstream = self._match(request.url)
        if upstream is not None:
            pool = _calling_pool.get()
            if _is_async_call(pool):
                return upstream._serve_async(request, pool)
            return upstream._serve_sync(request, pool)
        # Not ours: pass through to the network, unless another respx router comes after
        # this one (then let it answer: returning None makes this router "not mocked").
        routers = HTTPCoreMocker.routers
        if routers and routers[-1] is not self._router:
            return None
        return request

    def _match(self, url: httpx.URL) -> Upstream | None:
        """The newest fake for ``url``; a fake whose matching fails is skipped (as if it
        did not exist: the call goes on to the next fake or the network)."""
        for upstream in list(self._upstreams):
            try:
                if upstream.matches(url):
                    return upstream
            except Exception as exc:
                _failed("matching requests to fakes", exc)
        return None

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
        """The slot counter of the caller's pool (one per pool, made on first use);
        None: no accounting for this call."""
        if pool is None:
            return None
        try:
            with self._slots_lock:
                slots = table.get(pool)
                if slots is None:
                    slots = table[pool] = make()
                return slots
        except Exception as exc:
            _failed("pool slots", exc)
            return None

    @property
    def upstreams(self) -> list[Upstream]:
        return list(self._upstreams)

    @property
    def servers(self) -> list[Server]:
        return list(self._servers)

    def close(self) -> None:
        """Restore the pool methods, stop the router, stop every served upstream."""
        self._patches.restore()
        self._router_patch.restore()
        self._router = None
        errors: list[BaseException] = []
        while self._servers:
            try:
                self._servers.pop().close()
            except BaseException as exc:  # keep closing the others
                errors.append(exc)
        if errors:
            raise errors[0]

    async def aclose(self) -> None:
        self.close()

    def __enter__(self) -> SlowUpstreams:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_async_call(pool: object | None) -> bool:
    """Whether the httpcore call being mocked is the async one (set by our pool wrapper)."""
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


@contextlib.contextmanager
def slow_upstreams() -> Iterator[SlowUpstreams]:
    """``with slow_upstreams() as up: ...``: the factory, closed on the way out."""
    factory = SlowUpstreams()
    try:
        yield factory
    finally:
        factory.close()
