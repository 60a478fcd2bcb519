"""Slow upstream fakes (respx) and served upstreams (real loopback HTTP server)."""

from __future__ import annotations

import inspect
import socket
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpcore
import httpx
import pytest
from fastapi import FastAPI
from respx.mocks import HTTPCoreMocker

from pytest_stallguard import context, patching, traps
from pytest_stallguard.clock import real
from pytest_stallguard.guard import Guard
from pytest_stallguard.upstream import Server, SlowUpstreams, fake, serve, slow_upstreams
from pytest_stallguard.upstream.calls import CallLog

# Everything here works on both backends (the fakes sleep with anyio, the server has its
# own thread and loop).
from .conftest import asgi_client

pytestmark = pytest.mark.anyio



@pytest.fixture(params=["asyncio", "trio"], ids=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def line_of(func: Callable[..., Any], text: str) -> int:
    """The line number of the first source line of ``func`` that contains ``text``."""
    lines, start = inspect.getsourcelines(func)
    for offset, line in enumerate(lines):
        if text in line:
            return start + offset
    raise AssertionError(f"{text!r} not in {func.__name__}")



@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0)) as c:
        yield c


# -- the fake -----------------------------------------------------------------------------


async def test_delay_status_and_json(upstreams: SlowUpstreams, client: httpx.AsyncClient
                                     ) -> None:
    delay = 0.5
    slow = upstreams("https://slow.example", delay=delay, json={"paid": True}, status=201)
    fast = upstreams("https://fast.example")
    started = context.perf_counter()
    response = await client.post("https://slow.example/charge", json={"amount": 3})
    slow_s = context.perf_counter() - started
    assert response.status_code == 201
    assert response.json() == {"paid": True}
    started = context.perf_counter()
    assert (await client.get("https://fast.example/")).status_code == 200
    fast_s = context.perf_counter() - started
    assert slow_s >= delay  # a sleep is never shorter than asked
    assert fast_s < slow_s / 2
    assert [c.outcome for c in slow.calls] == ["ok"]
    assert slow.calls[0].method == "POST"
    assert slow.calls[0].url == "https://slow.example/charge"
    assert len(fast.calls) == 1


async def test_read_timeout_at_the_callers_deadline(upstreams: SlowUpstreams) -> None:
    delay = 5.0
    up = upstreams("https://payments.example", delay=delay)
    async with httpx.AsyncClient(timeout=httpx.Timeout(2.0, read=0.1)) as c:
        started = context.perf_counter()
        with pytest.raises(httpx.ReadTimeout) as caught:
            await c.post("https://payments.example/charge")
        elapsed = context.perf_counter() - started
    assert caught.value.request.url == "https://payments.example/charge"
    assert isinstance(caught.value.__cause__, httpcore.ReadTimeout)  # mapped as httpx maps
    assert 0.1 <= elapsed < delay / 5
    assert up.timed_out == 1
    assert up.calls[0].outcome == "read-timeout"
    assert up.in_flight == 0


async def test_connect_timeout_and_connect_error(upstreams: SlowUpstreams) -> None:
    connect_delay = 5.0  # fifty times the connect timeout (the fake stops at the timeout)
    slow_connect = upstreams("https://connect.example", connect_delay=connect_delay)
    refused = upstreams("https://refused.example", connect_error=True)
    async with httpx.AsyncClient(timeout=httpx.Timeout(2.0, connect=0.1)) as c:
        started = context.perf_counter()
        with pytest.raises(httpx.ConnectTimeout):
            await c.get("https://connect.example/")
        assert context.perf_counter() - started < connect_delay / 5
        with pytest.raises(httpx.ConnectError):
            await c.get("https://refused.example/")
    assert slow_connect.calls[0].outcome == "connect-timeout"
    assert refused.calls[0].outcome == "connect-error"


async def test_pool_limits_give_pool_timeout(upstreams: SlowUpstreams) -> None:
    up = upstreams("https://payments.example", delay=1.0)  # ten times the pool timeout
    outcomes: list[str] = []
    limits = httpx.Limits(max_connections=2)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(5.0, pool=0.1)) as c:

        async def one() -> None:
            try:
                await c.get("https://payments.example/x")
                outcomes.append("ok")
            except httpx.PoolTimeout as exc:
                assert exc.request.url.host == "payments.example"
                outcomes.append("pool-timeout")

        async with anyio.create_task_group() as tg:
            for _ in range(6):
                tg.start_soon(one)
    assert sorted(outcomes) == ["ok"] * 2 + ["pool-timeout"] * 4
    assert up.max_in_flight == 2
    assert up.timed_out == 4
    assert sorted(c.outcome for c in up.calls) == ["ok"] * 2 + ["pool-timeout"] * 4


async def test_pool_timeout_bounds_time_without_progress(upstreams: SlowUpstreams) -> None:
    """As in httpcore: a waiter is woken whenever a slot frees and waits again, so the
    total queue time can exceed the pool timeout without a PoolTimeout (FINDINGS)."""
    pool_timeout, delay, n = 1.0, 0.3, 10  # progress every 0.3 s, five rounds of two
    up = upstreams("https://payments.example", delay=delay)
    elapsed: list[float] = []
    limits = httpx.Limits(max_connections=2)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(5.0, pool=pool_timeout)
                                 ) as c:

        async def one() -> None:
            started = context.perf_counter()
            await c.get("https://payments.example/x")
            elapsed.append(context.perf_counter() - started)

        async with anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(one)
    assert len(elapsed) == n
    assert max(elapsed) > pool_timeout  # queued longer than the pool timeout, no error
    assert up.max_in_flight == 2
    assert up.timed_out == 0


async def test_each_pool_has_its_own_slots(upstreams: SlowUpstreams) -> None:
    up = upstreams("https://payments.example", delay=1.0)  # both start well within it
    limits = httpx.Limits(max_connections=1)
    async with (
        httpx.AsyncClient(limits=limits) as a,
        httpx.AsyncClient(limits=limits) as b,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(a.get, "https://payments.example/")
        tg.start_soon(b.get, "https://payments.example/")
    assert up.max_in_flight == 2


async def test_cancelled_call_is_recorded_and_frees_its_slot(upstreams: SlowUpstreams) -> None:
    up = upstreams("https://payments.example", delay=5.0)
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(10.0, pool=0.5)) as c:
        with anyio.move_on_after(0.1):
            await c.get("https://payments.example/")
        assert up.cancelled == 1
        assert up.calls[0].outcome == "cancelled"
        assert up.in_flight == 0
        quick = upstreams("https://payments.example/quick")  # more specific, newer: wins
        assert (await c.get("https://payments.example/quick/1")).status_code == 200
    assert len(quick.calls) == 1
    assert len(up.calls) == 1


async def test_fail_rate_is_seeded(upstreams: SlowUpstreams, client: httpx.AsyncClient) -> None:
    first = upstreams("https://a.example", fail_rate=0.5, seed=7)
    second = upstreams("https://b.example", fail_rate=0.5, seed=7)
    a = [(await client.get("https://a.example/")).status_code for _ in range(20)]
    b = [(await client.get("https://b.example/")).status_code for _ in range(20)]
    assert a == b
    assert set(a) == {200, 503}
    assert [c.status for c in first.calls] == a
    assert len(second.calls) == 20


def test_sync_client_honours_timeouts_and_limits(upstreams: SlowUpstreams) -> None:
    delay = 5.0  # fifty times the read timeout (the fake stops at the timeout)
    up = upstreams("https://payments.example", delay=delay)
    with httpx.Client(timeout=httpx.Timeout(5.0, read=0.1)) as c:
        started = context.perf_counter()
        with pytest.raises(httpx.ReadTimeout):
            c.get("https://payments.example/")
        assert context.perf_counter() - started < delay / 5
    assert up.calls[0].outcome == "read-timeout"


def test_bad_arguments_are_named() -> None:
    with slow_upstreams() as upstreams:
        with pytest.raises(ValueError, match="fail_rate"):
            upstreams("https://x.example", fail_rate=2.0)
        with pytest.raises(ValueError, match="absolute URL"):
            upstreams("/relative")


# -- missing-timeout ----------------------------------------------------------------------


def checkout_app(client: httpx.AsyncClient) -> FastAPI:
    app = FastAPI()

    @app.post("/checkout")
    async def checkout() -> dict[str, Any]:
        response = await client.post("https://payments.example/charge", json={"amount": 5})
        return {"status": response.status_code}

    app.state.endpoint = checkout
    return app


async def test_untimed_call_is_a_missing_timeout_finding(upstreams: SlowUpstreams) -> None:
    up = upstreams("https://payments.example", delay=0.01)
    async with httpx.AsyncClient(timeout=None) as untimed:
        app = checkout_app(untimed)
        async with asgi_client(app) as test_client:
            with Guard(threshold_ms=50) as g:
                for _ in range(3):
                    assert (await test_client.post("/checkout")).status_code == 200
    assert up.untimed == 3
    assert {call.request for call in up.calls} == {"POST /checkout"}
    [finding] = g.findings
    assert finding.kind == "missing-timeout"
    assert finding.file == "tests/test_upstream.py"
    assert finding.function == "checkout"
    assert finding.line == line_of(checkout_app, "await client.post(")
    assert finding.request == "POST /checkout"
    assert finding.count == 3
    assert "https://payments.example/charge" in finding.message
    assert "httpx.Timeout" in finding.message


async def test_timed_twin_has_no_finding(upstreams: SlowUpstreams) -> None:
    up = upstreams("https://payments.example", delay=0.01)
    async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0)) as timed, asgi_client(
        checkout_app(timed)
    ) as test_client:
        with Guard(threshold_ms=50) as g:
            assert (await test_client.post("/checkout")).status_code == 200
    assert up.untimed == 0
    assert g.findings == []


async def test_untimed_call_outside_a_request_is_counted_not_reported(
    upstreams: SlowUpstreams,
) -> None:
    up = upstreams("https://payments.example")
    async with httpx.AsyncClient(timeout=None) as c:
        with Guard() as g:
            await c.get("https://payments.example/")
    assert up.untimed == 1
    assert g.findings == []  # the test's own code is not a finding


# -- pass-through and served upstreams ----------------------------------------------------


async def test_served_upstream_is_not_intercepted(upstreams: SlowUpstreams) -> None:
    fake = upstreams("https://payments.example")
    server = upstreams.serve(delay=0.05, json={"real": True})
    async with httpx.AsyncClient(timeout=5.0) as c:
        response = await c.get(server.url + "/a?b=1")
    assert response.json() == {"real": True}
    assert [call.url for call in server.calls] == [server.url + "/a?b=1"]
    assert fake.calls == []


async def test_served_upstream_concurrency_and_keep_alive() -> None:
    with serve(delay=1.0) as server:  # all five are in flight well within it
        async with httpx.AsyncClient(timeout=5.0) as c:
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(c.get, server.url)
            assert server.max_in_flight == 5
            await c.get(server.url)  # reuses a kept-alive connection
            pool = c._transport._pool  # type: ignore[attr-defined]
            assert len(pool.connections) == 5
            assert server.connections == 5
        assert len(server.calls) == 6
        assert all(call.outcome == "ok" for call in server.calls)


async def test_served_upstream_real_read_timeout() -> None:
    delay = 5.0  # fifty times the read timeout; closing the server drops the call
    with serve(delay=delay) as server:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=0.1)) as c:
            started = context.perf_counter()
            with pytest.raises(httpx.ReadTimeout):
                await c.get(server.url)
            assert context.perf_counter() - started < delay / 5


def test_serve_from_sync_code_and_close_is_bounded() -> None:
    server = serve(json=[1, 2], status=202)
    try:
        with httpx.Client(timeout=5.0) as c:
            response = c.post(server.url + "/x", content=b"hello")
        assert (response.status_code, response.json()) == (202, [1, 2])
    finally:
        server.close()
    assert server.threads() == []
    with pytest.raises(httpx.ConnectError), httpx.Client(timeout=1.0) as c:
        c.get(server.url)


# -- restoring ----------------------------------------------------------------------------


def test_close_restores_the_pool_methods_even_after_an_error() -> None:
    async_original = httpcore.AsyncConnectionPool.__dict__["handle_async_request"]
    sync_original = httpcore.ConnectionPool.__dict__["handle_request"]
    with pytest.raises(RuntimeError, match="boom"), slow_upstreams() as upstreams:
        upstreams("https://payments.example")
        assert httpcore.AsyncConnectionPool.__dict__["handle_async_request"] is not (
            async_original
        )
        assert {(p.owner, p.name) for p in patching.live()} >= {
            ("slow upstream", "handle_async_request"),
            ("slow upstream", "handle_request"),
        }
        server = upstreams.serve()
        raise RuntimeError("boom")
    assert httpcore.AsyncConnectionPool.__dict__["handle_async_request"] is async_original
    assert httpcore.ConnectionPool.__dict__["handle_request"] is sync_original
    assert [p for p in patching.live() if p.owner == "slow upstream"] == []
    assert server.threads() == []
    upstreams.close()  # idempotent


def test_restore_all_takes_the_router_off_too() -> None:
    """What the plugin does when a run is interrupted: every patch of ours comes off,
    the respx router we started included, and the pool methods are the originals."""
    async_original = httpcore.AsyncConnectionPool.__dict__["handle_async_request"]
    sync_original = httpcore.ConnectionPool.__dict__["handle_request"]
    upstreams = SlowUpstreams()
    upstreams("https://payments.example")
    assert {(p.owner, p.target.rsplit(".")[-1], p.name) for p in patching.live()} == {
        ("slow upstream", "respx", "respx router"),
        ("slow upstream", "AsyncConnectionPool", "handle_async_request"),
        ("slow upstream", "ConnectionPool", "handle_request"),
    }
    patching.restore_all()
    assert patching.live() == []
    assert httpcore.AsyncConnectionPool.__dict__["handle_async_request"] is async_original
    assert httpcore.ConnectionPool.__dict__["handle_request"] is sync_original
    assert HTTPCoreMocker.routers == []
    upstreams.close()  # afterwards: nothing left to do, no error


async def test_coexists_with_a_users_respx_router(upstreams: SlowUpstreams,
                                                 client: httpx.AsyncClient) -> None:
    import respx

    up = upstreams("https://payments.example", delay=0.01)
    with respx.mock(assert_all_called=False) as user_router:
        user_router.get("https://users.example/me").respond(json={"me": 1})
        assert (await client.get("https://users.example/me")).json() == {"me": 1}
        assert (await client.get("https://payments.example/")).status_code == 200
    assert len(up.calls) == 1


# -- the loopback server: its own threads, the real clock, a bounded close -----------------


def threads_of(server: Server) -> list[threading.Thread]:
    """The server's threads, found the way a user would: by name, in threading.enumerate()."""
    names = {f"stallguard-upstream-{server.port}", f"stallguard-upstream-{server.port}-conn"}
    return [t for t in threading.enumerate() if t.name in names]


async def wait_until(condition: Callable[[], bool], bound_s: float = 5.0) -> None:
    deadline = real.monotonic() + bound_s
    while not condition():
        assert real.monotonic() < deadline, "condition not met in time"
        await anyio.sleep(0.01)


async def test_served_upstream_sees_a_client_that_gives_up_as_cancelled() -> None:
    delay = 10.0
    with serve(delay=delay) as server:
        started = real.perf_counter()
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=0.1)) as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.get(server.url)
            # The client closed its connection on the timeout; the server sees it while
            # it is still being slow, not when its delay is over.
            await wait_until(lambda: server.cancelled == 1)
        noticed_s = real.perf_counter() - started
        [call] = server.calls
        assert call.outcome == "cancelled"
        assert server.in_flight == 0
    assert noticed_s < delay / 5


async def test_close_is_bounded_drops_calls_in_flight_and_leaves_no_thread() -> None:
    delay = 30.0
    server = serve(delay=delay)
    errors: list[type[BaseException]] = []
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(2 * delay)) as c:

            async def one() -> None:
                try:
                    await c.get(server.url)
                except httpx.HTTPError as exc:
                    errors.append(type(exc))

            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(one)
                await wait_until(lambda: server.in_flight == 3)
                assert len(threads_of(server)) == 4  # the accept loop, one per connection
                started = real.perf_counter()
                server.close()
                closing_s = real.perf_counter() - started
    finally:
        server.close()
    assert closing_s < delay / 10
    assert server.threads() == []
    assert threads_of(server) == []
    assert errors == [httpx.RemoteProtocolError] * 3  # the clients see it close: no hang
    assert [call.outcome for call in server.calls] == ["pending"] * 3
    assert server.in_flight == 0


async def test_close_ends_idle_keep_alive_connections() -> None:
    with serve() as server:
        async with httpx.AsyncClient(timeout=5.0) as c:
            async with anyio.create_task_group() as tg:
                for _ in range(2):
                    tg.start_soon(c.get, server.url)
            assert server.connections == 2  # kept alive, their threads wait for a request
            assert len(threads_of(server)) == 3
            server.close()
            assert server.threads() == []
            assert threads_of(server) == []
            assert server.connections == 0


def listen_backlog(server: Server) -> int:
    """How many connections the kernel queues for the server's accept loop (Linux: a
    listening socket's tcp_info carries it in tcpi_sacked, what `ss -lt` shows as Send-Q)."""
    httpd = server._httpd
    assert httpd is not None
    info = httpd.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    state, *_, backlog = struct.unpack_from("=8B6I", info)
    assert state == 10  # TCP_LISTEN
    return int(backlog)


async def test_a_burst_of_connections_is_served_at_once() -> None:
    """Sixty clients connect at the same moment: all are in flight together. A small
    listen backlog would drop connection attempts, which clients retry a second later:
    checked at the socket itself, as a busy machine can spread a burst's starts too."""
    n = 60
    with serve(delay=2.0) as server:  # ten times the slowest spread seen beside CPU burners
        if sys.platform == "linux":
            assert listen_backlog(server) >= n
        async with httpx.AsyncClient(
            timeout=10.0, limits=httpx.Limits(max_connections=n)
        ) as c, anyio.create_task_group() as tg:
            for _ in range(n):
                tg.start_soon(c.get, server.url)
        assert server.max_in_flight == n
        assert [call.outcome for call in server.calls] == ["ok"] * n


def test_server_waits_on_the_real_clock_not_on_patched_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_sleep(seconds: float) -> None:
        raise AssertionError("the server called time.sleep")

    monkeypatch.setattr(time, "sleep", no_sleep)
    monkeypatch.setattr(time, "monotonic", lambda: 0.0)  # a clock that never moves
    monkeypatch.setattr(time, "perf_counter", lambda: 0.0)
    delay = 0.3
    with serve(delay=delay, json={"ok": True}) as server, httpx.Client(timeout=5.0) as c:
        started = real.perf_counter()
        assert c.get(server.url).json() == {"ok": True}
        elapsed = real.perf_counter() - started
    assert elapsed >= delay
    assert server.calls[0].duration_ms is not None and server.calls[0].duration_ms >= delay * 1000
    assert server.threads() == []


def test_server_under_freeze_time() -> None:
    freezegun = pytest.importorskip("freezegun")
    delay = 0.3
    with (
        freezegun.freeze_time("2020-01-01"),
        serve(delay=delay) as server,
        httpx.Client(timeout=5.0) as c,
    ):
        started = real.perf_counter()
        assert c.get(server.url).status_code == 200
        elapsed = real.perf_counter() - started
    assert elapsed >= delay
    assert server.threads() == []


async def test_traps_do_not_touch_the_served_upstream() -> None:
    """The server's blocking sockets run in its own threads: never a finding, while a
    blocking call in the app beside it is one (the traps were armed)."""
    with serve(delay=0.05, json={"ok": 1}) as server:
        async with httpx.AsyncClient(timeout=5.0) as upstream_client:
            app = FastAPI()

            @app.get("/proxy")
            async def proxy() -> Any:
                return (await upstream_client.get(server.url)).json()

            @app.get("/blocking")
            async def blocking() -> dict[str, bool]:
                time.sleep(0.001)
                return {"ok": True}

            async with asgi_client(app) as test_client:
                with Guard(threshold_ms=500, traps="record") as g:
                    traps.install()
                    try:
                        for _ in range(3):
                            assert (await test_client.get("/proxy")).json() == {"ok": 1}
                        assert (await test_client.get("/blocking")).status_code == 200
                    finally:
                        traps.uninstall()
        assert len(server.calls) == 3
    assert [(f.kind, f.function) for f in g.findings] == [("blocking-call", "blocking")]


# -- our bookkeeping fails: the app sees what it would have seen ---------------------------


@pytest.fixture
def notes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The hook-failure notes of this test (each note is made once per process)."""
    pending: list[str] = []
    monkeypatch.setattr(patching, "_warned", set())
    monkeypatch.setattr(patching, "_pending", pending)
    return pending


def broken(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("broken on purpose")


async def broken_async(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("broken on purpose")


# what to break -> (target, attribute, replacement, what the note names)
BREAKS: dict[str, tuple[Any, str, Any, str]] = {
    "log-begin": (CallLog, "begin", broken, "the call log"),
    "log-end": (CallLog, "end", broken, "the call log"),
    "log-enter": (CallLog, "enter", broken, "the call log"),
    "log-leave": (CallLog, "leave", broken, "the call log"),
    "slot-acquire": (fake._AsyncSlots, "acquire", broken_async, "pool slots"),
    "slot-release": (fake._AsyncSlots, "release", broken, "pool slots"),
    "pool-wait": (fake, "note_http_pool_wait", broken, "pool waits"),
}


async def outcome_of(call: Callable[[], Any]) -> tuple[Any, ...]:
    """What the caller sees: status and body, or the exception, its cause and request."""
    try:
        response = await call()
    except httpx.HTTPError as exc:
        return type(exc), type(exc.__cause__), str(exc.request.url)
    return response.status_code, response.json()


@pytest.mark.parametrize("scenario", ["response", "read-timeout"])
@pytest.mark.parametrize("what", list(BREAKS))
async def test_failing_bookkeeping_leaves_the_call_unchanged(
    upstreams: SlowUpstreams, monkeypatch: pytest.MonkeyPatch, notes: list[str],
    what: str, scenario: str,
) -> None:
    delay, read = (0.01, 5.0) if scenario == "response" else (2.0, 0.05)
    up = upstreams("https://payments.example", delay=delay, status=201, json={"paid": True})
    limits = httpx.Limits(max_connections=2)  # slot accounting applies
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(5.0, read=read)) as c:

        def call() -> Any:
            return c.post("https://payments.example/charge")

        intact = await outcome_of(call)
        assert notes == []
        target, name, replacement, note = BREAKS[what]
        with monkeypatch.context() as m:
            m.setattr(target, name, replacement)
            seen = await outcome_of(call)
        again = await outcome_of(call)  # and after, as before
    expected = (
        (201, {"paid": True}) if scenario == "response"
        else (httpx.ReadTimeout, httpcore.ReadTimeout, "https://payments.example/charge")
    )
    assert intact == seen == again == expected
    assert len(notes) == 1
    assert f"slow upstream cannot watch {note} with httpx" in notes[0]
    assert "RuntimeError: broken on purpose" in notes[0]
    assert up.in_flight <= 1  # at most the one whose leave() was broken


@pytest.mark.parametrize(
    "what", [(fake._SyncSlots, "acquire", "pool slots"), (CallLog, "end", "the call log")],
    ids=["slot-acquire", "log-end"],
)
def test_failing_bookkeeping_leaves_a_sync_call_unchanged(
    upstreams: SlowUpstreams, monkeypatch: pytest.MonkeyPatch, notes: list[str],
    what: tuple[Any, str, str],
) -> None:
    upstreams("https://payments.example", delay=0.01, json={"paid": True})
    target, name, note = what
    with httpx.Client(limits=httpx.Limits(max_connections=1), timeout=5.0) as c:
        intact = c.get("https://payments.example/").json()
        monkeypatch.setattr(target, name, broken)
        seen = c.get("https://payments.example/").json()
    assert intact == seen == {"paid": True}
    assert len(notes) == 1 and f"cannot watch {note} with httpx" in notes[0]


async def test_a_fake_that_cannot_match_lets_the_call_go_on(
    upstreams: SlowUpstreams, monkeypatch: pytest.MonkeyPatch, notes: list[str]
) -> None:
    server = upstreams.serve(json={"real": True})
    faked = upstreams(server.url, json={"fake": True})
    async with httpx.AsyncClient(timeout=5.0) as c:
        assert (await c.get(server.url)).json() == {"fake": True}
        monkeypatch.setattr(fake.Upstream, "matches", broken)
        assert (await c.get(server.url)).json() == {"real": True}  # as without the fake
    assert (len(faked.calls), len(server.calls)) == (1, 1)
    assert len(notes) == 1 and "cannot watch matching requests to fakes" in notes[0]


async def test_a_finding_that_fails_does_not_reach_the_app(
    upstreams: SlowUpstreams, monkeypatch: pytest.MonkeyPatch, notes: list[str]
) -> None:
    up = upstreams("https://payments.example", delay=0.01)
    async with httpx.AsyncClient(timeout=None) as untimed, asgi_client(
        checkout_app(untimed)
    ) as test_client:
        with Guard(threshold_ms=50) as g, monkeypatch.context() as m:
            m.setattr(Guard, "record", broken)
            response = await test_client.post("/checkout")
    assert (response.status_code, response.json()) == (200, {"status": 200})
    assert up.untimed == 1
    assert g.findings == []
    assert len(notes) == 1 and "cannot watch calls without a timeout" in notes[0]


async def test_a_lost_slot_does_not_hang_a_call_without_pool_timeout(
    upstreams: SlowUpstreams, monkeypatch: pytest.MonkeyPatch, notes: list[str]
) -> None:
    """A bug of ours that never gives a slot back: a caller with no pool timeout would
    wait forever; the wait ends at the bound and the call goes on."""
    monkeypatch.setattr(fake, "SLOT_WAIT_BOUND_S", 0.3)
    monkeypatch.setattr(fake, "_RECHECK_S", 0.05)
    monkeypatch.setattr(fake._AsyncSlots, "release", lambda self: None)
    up = upstreams("https://payments.example", delay=0.01)
    limits = httpx.Limits(max_connections=1)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(5.0, pool=None)) as c:
        assert (await c.get("https://payments.example/")).status_code == 200
        started = real.perf_counter()
        assert (await c.get("https://payments.example/")).status_code == 200
        waited = real.perf_counter() - started
    assert waited >= fake.SLOT_WAIT_BOUND_S
    assert [call.outcome for call in up.calls] == ["ok", "ok"]
    assert len(notes) == 1 and "cannot watch pool slots" in notes[0]


@pytest.mark.parametrize("name", ["begin", "enter", "end", "leave"])
async def test_a_failing_call_log_does_not_change_the_served_answer(
    monkeypatch: pytest.MonkeyPatch, notes: list[str], name: str
) -> None:
    with serve(delay=0.01, status=201, json={"real": True}) as server:
        async with httpx.AsyncClient(timeout=5.0) as c:
            intact = await outcome_of(lambda: c.get(server.url))
            with monkeypatch.context() as m:
                m.setattr(CallLog, name, broken)
                seen = await outcome_of(lambda: c.get(server.url))
            again = await outcome_of(lambda: c.get(server.url))
    assert intact == seen == again == (201, {"real": True})
    assert len(notes) == 1 and "cannot watch the served upstream's call log" in notes[0]


async def test_a_users_router_started_before_ours_outlives_it(client: httpx.AsyncClient) -> None:
    import respx

    async_original = httpcore.AsyncConnectionPool.__dict__["handle_async_request"]
    with respx.mock(assert_all_called=False) as user_router:
        user_router.get("https://users.example/me").respond(json={"me": 1})
        with slow_upstreams() as upstreams:
            up = upstreams("https://payments.example", delay=0.01, json={"paid": True})
            assert (await client.get("https://payments.example/")).json() == {"paid": True}
            assert (await client.get("https://users.example/me")).json() == {"me": 1}
        # Ours is gone, the user's router still answers.
        assert [p for p in patching.live() if p.owner == "slow upstream"] == []
        assert (await client.get("https://users.example/me")).json() == {"me": 1}
        with pytest.raises(respx.models.AllMockedAssertionError):
            await client.get("https://payments.example/")
    assert httpcore.AsyncConnectionPool.__dict__["handle_async_request"] is async_original
    assert len(up.calls) == 1
