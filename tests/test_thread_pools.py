"""Both thread pools a request can queue for, through pytest: anyio's worker threads and
asyncio's default executor. A request that waited past ``pool_wait_ms`` for a worker thread
is a ``threadpool-saturation`` finding, every time."""

from __future__ import annotations

import asyncio
import inspect
import os
from typing import Any

import pytest
from fastapi import FastAPI

from pytest_stallguard import patching
from pytest_stallguard.guard import Guard
from pytest_stallguard.pools import PoolWatch
from pytest_stallguard.pools.executor import ExecutorWatch

from .conftest import ASYNCIO, asgi_client, load_json

APP = '''
import asyncio
import time

from fastapi import FastAPI


def create_app():
    app = FastAPI()

    @app.get("/offload")
    async def offload():
        await asyncio.to_thread(time.sleep, 0.3)  # TO-THREAD
        return {"ok": True}

    @app.get("/report")  # REPORT
    def report():
        time.sleep(0.2)
        return {"ok": True}

    return app
'''

# What asyncio gives a loop's default executor on this machine.
WORKERS = min(32, (os.cpu_count() or 1) + 4)


def line_of(marker: str) -> int:
    return next(i for i, line in enumerate(APP.strip().splitlines(), 1) if marker in line)


@pytest.fixture
def app_dir(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(myapp=APP)
    pytester.syspathinsert()
    pytester.makeconftest(
        """
        import pytest
        from myapp import create_app

        @pytest.fixture
        def stall_app():
            return create_app()
        """
    )
    return pytester


def run_json(pytester: pytest.Pytester) -> tuple[pytest.RunResult, dict[str, Any]]:
    out = pytester.path / "r.json"
    result = pytester.runpytest("-p", "no:asyncio", f"--stall-report-json={out}")
    tests = {t["nodeid"].split("::")[1]: t for t in load_json(out)["tests"]}
    return result, tests


def saturation(test: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in test["findings"] if f["kind"] == "threadpool-saturation"]


def test_default_executor_queue_is_found_and_shown(app_dir: pytest.Pytester) -> None:
    wide = max(20, 3 * WORKERS)  # three waves of 0.3 s calls at least
    app_dir.makepyfile(
        f"""
        async def test_wide(stall_client):
            r = await stall_client.burst("GET", "/offload", n={wide})
            assert r.statuses[200] == {wide}

        async def test_few(stall_client):
            r = await stall_client.burst("GET", "/offload", n=3)
            assert r.statuses[200] == 3
        """
    )
    result, tests = run_json(app_dir)
    result.assert_outcomes(passed=1, failed=1)
    queued, few = tests["test_wide[asyncio]"], tests["test_few[asyncio]"]

    [finding] = saturation(queued)
    assert (finding["file"], finding["line"], finding["request"]) == (
        "myapp.py", line_of("TO-THREAD"), "GET /offload"
    )
    assert finding["count"] >= wide - 2 * WORKERS  # everyone after the first two waves
    assert "asyncio default executor" in finding["message"]
    assert saturation(few) == [] and few["findings"] == []

    def executor(test: dict[str, Any]) -> dict[str, Any]:
        [pool] = [p for p in test["pools"] if p["name"] == "asyncio default executor"]
        assert (pool["kind"], pool["size"]) == ("threadpool", WORKERS)
        return pool

    busy, calm = executor(queued), executor(few)
    assert busy["max_in_use"] == WORKERS and calm["max_in_use"] == 3
    # The queued burst waited whole 0.3 s calls for a worker; three requests did not.
    assert busy["wait_max_ms"] > 300 > calm["wait_max_ms"]
    assert busy["wait_max_ms"] > 5 * calm["wait_max_ms"]
    result.stdout.fnmatch_lines(["*threadpool-saturation*asyncio default executor*"])


def test_queueing_on_anyio_tokens_is_found_every_time(app_dir: pytest.Pytester) -> None:
    """50 requests to a 0.2 s `def` endpoint on anyio's default 40 tokens: 10 wait a whole
    call for a token (issue 8: found in 1 run of 18). Three runs, three findings."""
    app_dir.makepyfile(
        """
        import pytest

        @pytest.mark.parametrize("run", range(3))
        async def test_fifty(stall_client, run):
            r = await stall_client.burst("GET", "/report", n=50)
            assert r.statuses[200] == 50

        @pytest.mark.concurrency(pools={"threads": 2})
        async def test_shrunk(stall_client):
            r = await stall_client.burst("GET", "/report", n=8)
            assert r.statuses[200] == 8

        async def test_within_capacity(stall_client):
            r = await stall_client.burst("GET", "/report", n=3)
            assert r.statuses[200] == 3
        """
    )
    result, tests = run_json(app_dir)
    result.assert_outcomes(passed=1, failed=4)
    for name in ("test_fifty[0-asyncio]", "test_fifty[1-asyncio]", "test_fifty[2-asyncio]",
                 "test_shrunk[asyncio]"):
        [finding] = saturation(tests[name])
        assert (finding["file"], finding["request"]) == ("myapp.py", "GET /report")
        assert finding["line"] in (line_of("REPORT"), line_of("REPORT") + 1)
        [pool] = [p for p in tests[name]["pools"] if p["name"] == "anyio worker threads"]
        assert pool["wait_max_ms"] > 100  # pool_wait_ms keeps its default
    assert tests["test_within_capacity[asyncio]"]["findings"] == []
    fifty = [p for p in tests["test_fifty[0-asyncio]"]["pools"]
             if p["name"] == "anyio worker threads"]
    assert fifty[0]["size"] == 40 and fifty[0]["max_in_use"] == 40


# -- the executor watch itself: never in the app's way --------------------------------------

def offload_app(ran: list[int]) -> FastAPI:
    app = FastAPI()

    @app.get("/offload")
    async def offload() -> dict[str, int]:
        def work() -> int:
            ran.append(1)
            return 7

        loop = asyncio.get_running_loop()
        return {"a": await asyncio.to_thread(work), "b": await loop.run_in_executor(None, work)}

    return app


@pytest.mark.anyio
@ASYNCIO
@pytest.mark.parametrize("helper", ["_begin", "_submitted", "_started", "_ended", "_returned"])
async def test_a_failing_executor_hook_never_reaches_the_app(
    monkeypatch: pytest.MonkeyPatch, helper: str
) -> None:
    monkeypatch.setattr(patching, "_warned", set())
    patching.take_warnings()
    calls: list[int] = []

    def broken(*args: Any) -> None:
        calls.append(1)
        raise RuntimeError("bookkeeping broken on purpose")

    monkeypatch.setattr(ExecutorWatch, helper, broken)
    ran: list[int] = []
    signature = inspect.signature(asyncio.BaseEventLoop.run_in_executor)
    async with asgi_client(offload_app(ran)) as client:
        with Guard(), PoolWatch():
            assert inspect.signature(asyncio.BaseEventLoop.run_in_executor) == signature
            first = await client.get("/offload")
            second = await client.get("/offload")
    assert [first.json(), second.json()] == [{"a": 7, "b": 7}] * 2
    assert len(ran) == 4  # each call ran once
    assert len(calls) == 1  # then the hook was off
    [note] = patching.take_warnings()
    assert "asyncio" in note and "bookkeeping broken on purpose" in note


@pytest.mark.anyio
@ASYNCIO
async def test_executor_calls_are_timed_per_request() -> None:
    ran: list[int] = []
    async with asgi_client(offload_app(ran)) as client:
        with Guard() as g, PoolWatch() as watch:
            assert (await client.get("/offload")).json() == {"a": 7, "b": 7}
        outside = await asyncio.to_thread(lambda: 1)  # not a request: not watched
    assert outside == 1 and g.findings == []
    [pool] = [p for p in watch.stats() if p.name == "asyncio default executor"]
    assert (pool.kind, pool.size, len(pool.waits_ms)) == ("threadpool", WORKERS, 2)
    calls = watch._executor.calls
    assert [c.function for c in calls] == ["offload_app.<locals>.offload.<locals>.work"] * 2
    for call in calls:
        assert call.called <= (call.started or 0) <= (call.ended or 0)
