"""Shrinking and watching pools: worker threads, SQLAlchemy, httpx; client-per-request."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpcore
import httpx
import pytest
import sqlalchemy
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.engine.base import Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool.base import Pool
from sqlalchemy.pool.impl import AsyncAdaptedQueuePool, QueuePool

from pytest_stallguard.guard import Guard
from pytest_stallguard.pools import PoolWatch, ShrinkPools
from pytest_stallguard.upstream import SlowUpstreams, serve

from .conftest import ASYNCIO, BOTH, asgi_client, line_of

pytestmark = pytest.mark.anyio


# SQLAlchemy's async engines (and aiosqlite) run on asyncio only.




async def fire(client: httpx.AsyncClient, path: str, n: int) -> list[int]:
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await client.get(path)).status_code)

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return statuses


@pytest.fixture
async def shrink() -> AsyncIterator[ShrinkPools]:
    pools = ShrinkPools()
    try:
        yield pools
    finally:
        await pools.aclose()


# -- worker threads -----------------------------------------------------------------------


def report_app() -> FastAPI:
    app = FastAPI()

    @app.get("/report")
    def report() -> dict[str, bool]:
        time.sleep(0.2)  # a `def` endpoint: runs in a worker thread, fine on its own
        return {"ok": True}

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    return app


@BOTH
async def test_threadpool_saturation_is_found(shrink: ShrinkPools) -> None:
    app = report_app()
    endpoint = next(r.endpoint for r in app.routes if getattr(r, "path", "") == "/report")
    before = anyio.to_thread.current_default_thread_limiter().total_tokens
    async with asgi_client(app) as client:
        await client.get("/report")  # warm-up
        shrink.threads(2)
        assert anyio.to_thread.current_default_thread_limiter().total_tokens == 2
        with Guard(threshold_ms=50) as g, PoolWatch() as watch:
            statuses = await fire(client, "/report", 6)
    assert statuses == [200] * 6
    [finding] = g.findings
    assert finding.kind == "threadpool-saturation"
    assert finding.request == "GET /report"
    assert finding.file == "tests/test_pools.py"
    assert finding.function == "report"
    assert finding.line == endpoint.__code__.co_firstlineno
    assert finding.count >= 2
    assert finding.duration_ms is not None and finding.duration_ms > 50
    [stats] = watch.stats()
    assert (stats.kind, stats.size, stats.max_in_use) == ("threadpool", 2, 2)
    assert len(stats.waits_ms) >= 6  # FastAPI also serializes `def` responses in a thread
    await shrink.aclose()
    assert anyio.to_thread.current_default_thread_limiter().total_tokens == before


@BOTH
async def test_enough_threads_is_clean() -> None:
    async with asgi_client(report_app()) as client:
        await client.get("/report")
        with Guard(threshold_ms=50) as g, PoolWatch() as watch:
            statuses = await fire(client, "/report", 6)
    assert statuses == [200] * 6
    assert g.findings == []
    [stats] = watch.stats()
    assert stats.max_in_use == 6


@BOTH
async def test_late_thread_start_with_free_tokens_is_not_saturation() -> None:
    """Under a wide burst a worker can start late (GIL, busy loop) while tokens are free:
    that is not the pool running dry."""
    app = FastAPI()

    @app.get("/tiny")
    def tiny() -> dict[str, int]:
        return {"x": 1}

    async with asgi_client(app) as client:
        await client.get("/tiny")
        with Guard(threshold_ms=1) as g, PoolWatch() as watch:
            for _ in range(3):
                assert await fire(client, "/tiny", 40) == [200] * 40
    [stats] = watch.stats()
    assert stats.max_in_use < stats.size  # never saturated...
    assert stats.wait_max_ms > 1  # ...though some threads did start late
    assert g.findings == []  # ...so no finding, however late a thread started


@BOTH
async def test_threads_applies_at_first_use_when_called_outside_the_loop() -> None:
    shrink = ShrinkPools()
    original = anyio.to_thread.run_sync
    shrink.threads(3)  # no limiter to reach from here... (we are in the loop, so: direct)
    try:
        await anyio.to_thread.run_sync(lambda: None)
        assert anyio.to_thread.current_default_thread_limiter().total_tokens == 3
    finally:
        await shrink.aclose()
    assert anyio.to_thread.run_sync is original
    assert anyio.to_thread.current_default_thread_limiter().total_tokens == 40


def test_threads_deferred_from_sync_code() -> None:
    shrink = ShrinkPools()
    shrink.threads(3)  # no loop running: applied at the first worker-thread call
    seen: list[float] = []

    async def main() -> None:
        await anyio.to_thread.run_sync(lambda: None)
        seen.append(anyio.to_thread.current_default_thread_limiter().total_tokens)
        shrink.close()
        seen.append(anyio.to_thread.current_default_thread_limiter().total_tokens)

    anyio.run(main)
    assert seen == [3, 40]


# -- SQLAlchemy ---------------------------------------------------------------------------


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    # A queue pool, as SQLAlchemy >= 2.0.38 gives SQLite files by default (NullPool before).
    eng = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}", poolclass=AsyncAdaptedQueuePool
    )
    try:
        yield eng
    finally:
        await eng.dispose()


def dashboard_app(engine: AsyncEngine, client: httpx.AsyncClient) -> FastAPI:
    app = FastAPI()

    @app.get("/dashboard")
    async def dashboard() -> dict[str, int]:
        async with engine.connect() as conn:  # held across the slow upstream call
            await conn.execute(text("select 1"))
            stats = await client.get("https://stats.example/today")
        return {"status": stats.status_code}

    @app.get("/dashboard-fixed")
    async def dashboard_fixed() -> dict[str, int]:
        stats = await client.get("https://stats.example/today")
        async with engine.connect() as conn:
            await conn.execute(text("select 1"))
        return {"status": stats.status_code}

    return app


@ASYNCIO
async def test_holding_a_connection_across_a_slow_call_exhausts_the_pool(
    engine: AsyncEngine, shrink: ShrinkPools, upstreams: SlowUpstreams
) -> None:
    upstreams("https://stats.example", delay=0.3)
    async with httpx.AsyncClient(timeout=5.0) as upstream_client:
        app = dashboard_app(engine, upstream_client)
        async with asgi_client(app) as client:
            await client.get("/dashboard")
            original_pool = engine.sync_engine.pool
            small = shrink.sqlalchemy(engine, size=2, overflow=0, timeout=0.1)
            assert engine.sync_engine.pool is small
            with Guard(threshold_ms=50) as g, PoolWatch() as watch:
                statuses = await fire(client, "/dashboard", 6)
    assert sorted(statuses) == [200, 200, 500, 500, 500, 500]
    [finding] = g.findings
    assert finding.kind == "pool-exhaustion"
    assert finding.request == "GET /dashboard"
    assert finding.file == "tests/test_pools.py"
    assert finding.function == "dashboard"
    assert finding.line == line_of(dashboard_app, "async with engine.connect() as conn:  #")
    assert "pool timeout" in finding.message
    [stats] = [s for s in watch.stats() if s.kind == "sqlalchemy"]
    assert (stats.size, stats.max_in_use, stats.timeouts) == (2, 2, 4)
    await shrink.aclose()
    assert engine.sync_engine.pool is original_pool


@ASYNCIO
async def test_fixed_dashboard_is_clean(
    engine: AsyncEngine, shrink: ShrinkPools, upstreams: SlowUpstreams
) -> None:
    upstreams("https://stats.example", delay=0.3)
    async with httpx.AsyncClient(timeout=5.0) as upstream_client, asgi_client(
        dashboard_app(engine, upstream_client)
    ) as client:
        await client.get("/dashboard-fixed")
        shrink.sqlalchemy(engine, size=2, overflow=0, timeout=0.5)
        with Guard(threshold_ms=50) as g, PoolWatch() as watch:
            statuses = await fire(client, "/dashboard-fixed", 6)
    assert statuses == [200] * 6
    assert g.findings == []
    [stats] = [s for s in watch.stats() if s.kind == "sqlalchemy"]
    assert stats.timeouts == 0


def test_sync_engine_shrink_and_restore(tmp_path: Path) -> None:
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'x.db'}", poolclass=QueuePool)
    original = engine.pool
    shrink = ShrinkPools()
    with shrink:
        small = shrink.sqlalchemy(engine, size=1, timeout=0.05)
        with engine.connect(), pytest.raises(sqlalchemy.exc.TimeoutError), engine.connect():
            pass
        assert small.size() == 1
    assert engine.pool is original
    engine.dispose()


def test_shrinking_a_pool_without_a_size_is_an_error(tmp_path: Path) -> None:
    engine = sqlalchemy.create_engine("sqlite://")  # SingletonThreadPool / StaticPool
    with ShrinkPools() as shrink, pytest.raises(TypeError, match="no size to shrink"):
        shrink.sqlalchemy(engine)
    engine.dispose()


# -- httpx --------------------------------------------------------------------------------


def payments_app(client: httpx.AsyncClient, url: str) -> FastAPI:
    app = FastAPI()

    @app.get("/pay")
    async def pay() -> dict[str, int]:
        response = await client.get(url)
        return {"status": response.status_code}

    return app


@BOTH
async def test_httpx_pool_exhaustion_against_a_real_server(shrink: ShrinkPools) -> None:
    with serve(delay=0.3) as server:
        async with httpx.AsyncClient(timeout=5.0) as upstream_client:
            pool = upstream_client._transport._pool  # type: ignore[attr-defined]
            saved = (pool._max_connections, upstream_client.timeout)
            app = payments_app(upstream_client, server.url)
            async with asgi_client(app) as client:
                await client.get("/pay")
                shrink.httpx(upstream_client, max_connections=1, pool_timeout=0.1)
                assert upstream_client.timeout.pool == 0.1
                with Guard(threshold_ms=50) as g, PoolWatch() as watch:
                    statuses = await fire(client, "/pay", 4)
            await shrink.aclose()
            assert (pool._max_connections, upstream_client.timeout) == saved
    assert sorted(statuses) == [200, 500, 500, 500]
    [finding] = g.findings
    assert finding.kind == "pool-exhaustion"
    assert finding.request == "GET /pay"
    assert (finding.file, finding.function) == ("tests/test_pools.py", "pay")
    assert finding.line == line_of(payments_app, "await client.get(url)")
    assert "PoolTimeout" in finding.message
    [stats] = [s for s in watch.stats() if s.kind == "httpx"]
    assert (stats.size, stats.timeouts) == (1, 3)
    assert server.max_in_flight == 1


@BOTH
async def test_httpx_pool_wait_over_threshold(shrink: ShrinkPools,
                                              upstreams: SlowUpstreams) -> None:
    upstreams("https://payments.example", delay=0.1)
    async with httpx.AsyncClient(timeout=5.0) as upstream_client:
        app = payments_app(upstream_client, "https://payments.example/charge")
        async with asgi_client(app) as client:
            await client.get("/pay")
            shrink.httpx(upstream_client, max_connections=1, pool_timeout=2.0)
            with Guard(threshold_ms=50) as g, PoolWatch() as watch:
                statuses = await fire(client, "/pay", 3)
    assert statuses == [200] * 3
    [finding] = g.findings
    assert (finding.kind, finding.function, finding.request) == (
        "pool-exhaustion", "pay", "GET /pay"
    )
    assert "waited" in finding.message
    [stats] = [s for s in watch.stats() if s.kind == "httpx"]
    assert max(stats.waits_ms) > 50


# -- client-per-request -------------------------------------------------------------------


def per_request_app(tmp_path: Path) -> FastAPI:
    app = FastAPI()

    @app.get("/quote")
    async def quote() -> dict[str, bool]:
        async with httpx.AsyncClient(timeout=5.0) as client:  # a new client per request
            assert client is not None
        return {"ok": True}

    @app.get("/orders")
    async def orders() -> dict[str, bool]:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'o.db'}")
        await engine.dispose()
        return {"ok": True}

    return app


@ASYNCIO
async def test_client_and_engine_per_request_are_found(tmp_path: Path) -> None:
    app = per_request_app(tmp_path)
    async with asgi_client(app) as client:
        with Guard(threshold_ms=50) as g, PoolWatch():
            assert (await client.get("/quote")).status_code == 200
            assert (await client.get("/quote")).status_code == 200
            assert (await client.get("/orders")).status_code == 200
    found = {(f.request, f.function): f for f in g.findings}
    assert set(found) == {("GET /quote", "quote"), ("GET /orders", "orders")}
    quote = found["GET /quote", "quote"]
    assert quote.kind == "client-per-request"
    assert quote.count == 2
    assert quote.file == "tests/test_pools.py"
    assert quote.line == line_of(per_request_app, "httpx.AsyncClient(timeout=5.0)")
    orders = found["GET /orders", "orders"]
    assert orders.line == line_of(per_request_app, "create_async_engine(")
    assert "SQLAlchemy engine" in orders.message


@BOTH
async def test_shared_client_is_clean() -> None:
    shared = httpx.AsyncClient(timeout=5.0)
    app = FastAPI()

    @app.get("/quote")
    async def quote() -> dict[str, bool]:
        return {"ok": shared is not None}

    async with asgi_client(app) as client:
        with Guard() as g, PoolWatch():
            lifespan_like = httpx.AsyncClient()  # the test's own code: not a finding
            assert (await client.get("/quote")).status_code == 200
    await lifespan_like.aclose()
    await shared.aclose()
    assert g.findings == []


# -- zero-config and restoring ------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"thread": 2}, "unknown pool 'thread'; valid ones: threads, sqlalchemy, httpx"),
        ({"httpx": 0}, r'pools\["httpx"\]=0 is not valid'),
        ({"sqlalchemy": True}, "True is not valid"),
        ({"threads": "2"}, "'2' is not valid"),
        ([("threads", 2)], "give a dict"),
    ],
)
def test_apply_validates_the_spec(spec: Any, match: str) -> None:
    with ShrinkPools() as shrink, pytest.raises(ValueError, match=match):
        shrink.apply(spec)


@ASYNCIO
async def test_apply_shrinks_what_is_created_and_restores(tmp_path: Path) -> None:
    originals = (
        httpcore.AsyncConnectionPool.__init__,
        httpcore.ConnectionPool.__init__,
        QueuePool.__init__,
        anyio.to_thread.run_sync,
    )
    shrink = ShrinkPools()
    shrink.apply({"threads": 3, "sqlalchemy": 2, "httpx": 2})
    try:
        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=50))
        assert client._transport._pool._max_connections == 2  # type: ignore[attr-defined]
        engine = create_async_engine(
            f"sqlite+aiosqlite:///{tmp_path / 'a.db'}",
            poolclass=AsyncAdaptedQueuePool, pool_size=20, max_overflow=5,
        )
        assert engine.sync_engine.pool.size() == 2  # type: ignore[attr-defined]
        assert engine.sync_engine.pool._max_overflow == 0  # type: ignore[attr-defined]
        await anyio.to_thread.run_sync(lambda: None)
        assert anyio.to_thread.current_default_thread_limiter().total_tokens == 3
    finally:
        await shrink.aclose()
        await client.aclose()
        await engine.dispose()
    assert (
        httpcore.AsyncConnectionPool.__init__,
        httpcore.ConnectionPool.__init__,
        QueuePool.__init__,
        anyio.to_thread.run_sync,
    ) == originals
    assert anyio.to_thread.current_default_thread_limiter().total_tokens == 40
    with httpx.Client() as later:
        assert later._transport._pool._max_connections == 100  # type: ignore[attr-defined]


@ASYNCIO
async def test_everything_is_restored_after_an_exception(engine: AsyncEngine) -> None:
    originals = {
        "run_sync": anyio.to_thread.run_sync,
        "async transport": httpx.AsyncHTTPTransport.__dict__["handle_async_request"],
        "sync transport": httpx.HTTPTransport.__dict__["handle_request"],
        "pool connect": Pool.__dict__["connect"],
        "engine init": Engine.__dict__["__init__"],
        "client init": httpx.AsyncClient.__dict__["__init__"],
    }
    original_pool = engine.sync_engine.pool
    with pytest.raises(RuntimeError, match="app failed"):
        async with ShrinkPools() as shrink:
            with PoolWatch():
                shrink.threads(2)
                shrink.sqlalchemy(engine, size=1)
                shrink.apply({"httpx": 1})
                raise RuntimeError("app failed")
    assert {
        "run_sync": anyio.to_thread.run_sync,
        "async transport": httpx.AsyncHTTPTransport.__dict__["handle_async_request"],
        "sync transport": httpx.HTTPTransport.__dict__["handle_request"],
        "pool connect": Pool.__dict__["connect"],
        "engine init": Engine.__dict__["__init__"],
        "client init": httpx.AsyncClient.__dict__["__init__"],
    } == originals
    assert engine.sync_engine.pool is original_pool
    assert anyio.to_thread.current_default_thread_limiter().total_tokens == 40


@BOTH
async def test_patches_can_be_undone_in_any_order() -> None:
    original = anyio.to_thread.run_sync
    shrink = ShrinkPools()
    shrink.threads(4)  # layer 1
    watch = PoolWatch().start()  # layer 2, on top
    shrink.close()  # the lower layer goes first
    assert anyio.to_thread.run_sync is not original
    assert await anyio.to_thread.run_sync(lambda: 7) == 7  # the chain still works
    watch.stop()
    assert anyio.to_thread.run_sync is original
    assert anyio.to_thread.current_default_thread_limiter().total_tokens == 40
