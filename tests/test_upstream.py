"""Slow upstream fakes (respx) and served upstreams (real loopback HTTP server)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpcore
import httpx
import pytest
from fastapi import FastAPI

from pytest_stallguard import context
from pytest_stallguard.guard import Guard
from pytest_stallguard.upstream import SlowUpstreams, serve, slow_upstreams

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
    slow = upstreams("https://slow.example", delay=0.2, json={"paid": True}, status=201)
    fast = upstreams("https://fast.example")
    started = context.perf_counter()
    response = await client.post("https://slow.example/charge", json={"amount": 3})
    slow_s = context.perf_counter() - started
    assert response.status_code == 201
    assert response.json() == {"paid": True}
    started = context.perf_counter()
    assert (await client.get("https://fast.example/")).status_code == 200
    fast_s = context.perf_counter() - started
    assert slow_s >= 0.2  # a sleep is never shorter than asked
    assert fast_s < slow_s
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
    slow_connect = upstreams("https://connect.example", connect_delay=3.0)
    refused = upstreams("https://refused.example", connect_error=True)
    async with httpx.AsyncClient(timeout=httpx.Timeout(2.0, connect=0.1)) as c:
        started = context.perf_counter()
        with pytest.raises(httpx.ConnectTimeout):
            await c.get("https://connect.example/")
        assert context.perf_counter() - started < 3.0 / 5
        with pytest.raises(httpx.ConnectError):
            await c.get("https://refused.example/")
    assert slow_connect.calls[0].outcome == "connect-timeout"
    assert refused.calls[0].outcome == "connect-error"


async def test_pool_limits_give_pool_timeout(upstreams: SlowUpstreams) -> None:
    up = upstreams("https://payments.example", delay=0.5)
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
    pool_timeout, delay = 0.5, 0.3
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
            for _ in range(8):
                tg.start_soon(one)
    assert len(elapsed) == 8
    assert max(elapsed) > pool_timeout  # queued longer than the pool timeout, no error
    assert up.max_in_flight == 2
    assert up.timed_out == 0


async def test_each_pool_has_its_own_slots(upstreams: SlowUpstreams) -> None:
    up = upstreams("https://payments.example", delay=0.2)
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
    up = upstreams("https://payments.example", delay=2.0)
    with httpx.Client(timeout=httpx.Timeout(5.0, read=0.1)) as c:
        started = context.perf_counter()
        with pytest.raises(httpx.ReadTimeout):
            c.get("https://payments.example/")
        assert context.perf_counter() - started < 2.0 / 5
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
    with serve(delay=0.2) as server:
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
    delay = 3.0
    with serve(delay=delay) as server:
        async with httpx.AsyncClient(timeout=httpx.Timeout(5.0, read=0.1)) as c:
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
    assert not server._thread.is_alive()
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
        server = upstreams.serve()
        raise RuntimeError("boom")
    assert httpcore.AsyncConnectionPool.__dict__["handle_async_request"] is async_original
    assert httpcore.ConnectionPool.__dict__["handle_request"] is sync_original
    assert not server._thread.is_alive()
    upstreams.close()  # idempotent


async def test_coexists_with_a_users_respx_router(upstreams: SlowUpstreams,
                                                 client: httpx.AsyncClient) -> None:
    import respx

    up = upstreams("https://payments.example", delay=0.01)
    with respx.mock(assert_all_called=False) as user_router:
        user_router.get("https://users.example/me").respond(json={"me": 1})
        assert (await client.get("https://users.example/me")).json() == {"me": 1}
        assert (await client.get("https://payments.example/")).status_code == 200
    assert len(up.calls) == 1
