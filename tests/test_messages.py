"""Messages and reports a user can act on: outcomes, totals, folded pools, where files went."""

from __future__ import annotations

import json

import pytest

from pytest_stallguard.model import PoolStats, TestRecord
from pytest_stallguard.plugin import SYNC_CLIENT_MESSAGE
from pytest_stallguard.report import text


def test_a_sync_test_asking_for_stall_client_is_told_to_be_async(shop: pytest.Pytester) -> None:
    shop.makepyfile(
        """
        def test_sync(stall_client):
            stall_client.get("/health")
        """
    )
    result = shop.runpytest("-p", "no:asyncio")
    result.assert_outcomes(errors=1)
    expected = SYNC_CLIENT_MESSAGE.format(test="test_a_sync_test_asking_for_stall_client_is_told_to_be_async.py::test_sync", name="test_sync")
    result.stdout.fnmatch_lines([expected.replace("[", "[[]")])


def test_xfailed_tests_are_xfailed_in_the_report_with_totals_and_paths(
    shop: pytest.Pytester,
) -> None:
    shop.makepyfile(
        """
        import time
        import pytest

        @pytest.mark.xfail(strict=True)
        async def test_expected(stall_client, stall_guard):
            with stall_guard.only():
                time.sleep(0.01)

        async def test_fine(stall_client):
            assert (await stall_client.get("/health")).status_code == 200
        """
    )
    result = shop.runpytest(
        "-p", "no:asyncio", "--stall-report", "--stall-report-json=out/r.json"
    )
    result.assert_outcomes(passed=1, xfailed=1)
    result.stdout.fnmatch_lines(
        [
            "*::test_expected[[]asyncio[]] [[]xfailed[]]",
            "stallguard: 2 tests armed (1 passed, 1 xfailed); 0 bursts; findings: blocking-call x1",
            f"stallguard: JSON report written to {shop.path / 'out' / 'r.json'}",
        ]
    )
    report = json.loads((shop.path / "out" / "r.json").read_text())
    assert sorted(t["outcome"] for t in report["tests"]) == ["passed", "xfailed"]


def test_many_pools_of_one_name_fold_into_one_line() -> None:
    pools = [PoolStats(name="httpx pool" + (f" #{i}" if i > 1 else ""), kind="httpx", size=100,
                       max_in_use=1, waits_ms=(0.1,)) for i in range(1, 31)]
    pools.append(PoolStats(name="asyncpg pool", kind="asyncpg", size=10, max_in_use=4))
    lines = text.lines([TestRecord(nodeid="t", pools=pools)])
    pool_lines = [line for line in lines if line.strip().startswith("pool ")]
    assert len(pool_lines) == 2
    assert "x30: 30 created, each used once" in pool_lines[0]
    assert pool_lines[1].startswith("  pool asyncpg pool (asyncpg, size 10)")


@pytest.mark.parametrize("where", ["lifespan", "factory"])
def test_a_startup_that_raises_shows_the_users_error_first(
    pytester: pytest.Pytester, where: str
) -> None:
    pytester.makepyfile(
        myapp="""
        from contextlib import asynccontextmanager
        from fastapi import FastAPI

        def connect():
            raise RuntimeError("database is down")  # RAISE-LINE

        @asynccontextmanager
        async def lifespan(app):
            connect()
            yield

        def create_app():
            return FastAPI(lifespan=lifespan)

        def broken_factory():
            connect()
        """
    )
    spec = "myapp:create_app()" if where == "lifespan" else "myapp:broken_factory()"
    pytester.makeini(f"[pytest]\nstallguard_app = {spec}\n")
    pytester.syspathinsert()
    pytester.makepyfile(
        """
        async def test_it(stall_client):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:asyncio")
    result.assert_outcomes(errors=1)
    when = "during the app's lifespan startup" if where == "lifespan" else "built the app"
    result.stdout.fnmatch_lines(
        [
            "RuntimeError: database is down",
            "*myapp.py:* in connect",
            '*raise RuntimeError("database is down")*',
            f"(This happened *{when}*, before the test body ran.)",
        ]
    )
    out = result.stdout.str()
    assert "asgi_lifespan" not in out and "anyio/" not in out


def test_every_finding_in_the_failure_text_names_its_place() -> None:
    from pytest_stallguard.model import Finding
    from pytest_stallguard.run import failure_message

    named = Finding("blocking-call", "time.sleep() blocked ... at app.py:7 (login).", "app.py", 7, "login")
    unnamed = Finding("client-per-request", "An httpx client was created during GET /x.", "app.py", 12, "search")
    nowhere = Finding("canary-slowdown", "The canary slowed down.")
    text = failure_message([named, unnamed, nowhere])
    assert text.count("app.py:7") == 1
    assert "An httpx client was created during GET /x. (at app.py:12 in search)" in text
    assert "The canary slowed down.\n" in text
