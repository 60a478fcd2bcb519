"""Both thread pools a request can queue for, through pytest: anyio's worker threads and
asyncio's default executor. A request that waited past ``pool_wait_ms`` for a worker thread
is a ``threadpool-saturation`` finding, every time."""

from __future__ import annotations

import os
from typing import Any

import pytest

from .conftest import load_json

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
