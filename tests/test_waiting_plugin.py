"""Slow upstreams, shrunken pools and leak checks through pytest, as users meet them."""

from __future__ import annotations

import pytest

from .conftest import load_json

APP = '''
import asyncio
from contextlib import asynccontextmanager

import anyio
import httpx
from fastapi import FastAPI

PAY = "https://pay.example"


def create_app(shared=True, timeout=1.0):
    @asynccontextmanager
    async def lifespan(app):
        async with httpx.AsyncClient(timeout=timeout) as client:
            app.state.http = client
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/pay")
    async def pay():
        if shared:
            reply = await app.state.http.post(f"{PAY}/charge")
        else:
            async with httpx.AsyncClient(timeout=None) as client:  # PER-REQUEST
                reply = await client.post(f"{PAY}/charge")  # NO-TIMEOUT
        return {"status": reply.status_code}

    @app.get("/fire")
    async def fire():
        async def forgotten():
            await app.state.http.post(f"{PAY}/charge")
        asyncio.get_running_loop().create_task(forgotten())  # FIRE-AND-FORGET
        return {"ok": True}

    @app.get("/thread")
    def thread():
        import time
        time.sleep(0.2)
        return {"ok": True}

    return app
'''


@pytest.fixture
def app_dir(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(myapp=APP)
    pytester.syspathinsert()
    return pytester


def line_of(marker: str) -> int:
    return next(i for i, line in enumerate(APP.strip().splitlines(), 1) if marker in line)


def test_slow_upstream_timeouts_and_clean_twin(app_dir: pytest.Pytester) -> None:
    app_dir.makepyfile(
        """
        import pytest
        from myapp import create_app, PAY

        @pytest.fixture
        def stall_app():
            return create_app(timeout=1.0)       # all five are in flight well within it

        async def test_slow_provider(stall_client, slow_upstream):
            delay = 5.0
            up = slow_upstream(PAY, delay=delay)
            r = await stall_client.burst("POST", "/pay", n=5)
            assert r.statuses[500] == 5          # httpx.ReadTimeout at the caller's deadline
            assert up.timed_out == 5 and up.max_in_flight == 5
            assert r.max_ms < delay * 1000 / 2   # nobody waited for the slow provider

        async def test_quick_provider(stall_client, slow_upstream):
            up = slow_upstream(PAY, delay=0.01, json={"ok": True})
            r = await stall_client.burst("POST", "/pay", n=5)
            assert r.statuses[200] == 5 and up.timed_out == 0 and up.untimed == 0
        """
    )
    app_dir.runpytest("-p", "no:asyncio").assert_outcomes(passed=2)


def test_missing_timeout_and_client_per_request(app_dir: pytest.Pytester) -> None:
    app_dir.makepyfile(
        """
        import pytest
        from myapp import create_app, PAY

        @pytest.fixture
        def stall_app():
            return create_app(shared=False)

        async def test_it(stall_client, slow_upstream):
            slow_upstream(PAY, delay=0.01)
            r = await stall_client.burst("POST", "/pay", n=3)
            assert r.statuses[200] == 3
        """
    )
    out = app_dir.path / "r.json"
    result = app_dir.runpytest("-p", "no:asyncio", f"--stall-report-json={out}")
    result.assert_outcomes(failed=1)
    (test,) = load_json(out)["tests"]
    found = {f["kind"]: f for f in test["findings"]}
    assert found["missing-timeout"]["line"] == line_of("NO-TIMEOUT")
    assert found["client-per-request"]["line"] == line_of("PER-REQUEST")
    for kind in ("missing-timeout", "client-per-request"):
        assert (found[kind]["file"], found[kind]["request"], found[kind]["count"]) == (
            "myapp.py", "POST /pay", 3
        )


def test_fire_and_forget_task_is_a_leak_and_teardown_is_bounded(app_dir: pytest.Pytester) -> None:
    app_dir.makepyfile(
        """
        import time
        import pytest
        from myapp import create_app, PAY

        @pytest.fixture
        def stall_app():
            return create_app(timeout=60)

        async def test_it(stall_client, slow_upstream):
            slow_upstream(PAY, delay=30)
            assert (await stall_client.get("/fire")).status_code == 200
        """
    )
    out = app_dir.path / "r.json"
    result = app_dir.runpytest("-p", "no:asyncio", "--durations=1", f"--stall-report-json={out}")
    result.assert_outcomes(failed=1)
    (test,) = load_json(out)["tests"]
    (leak,) = [f for f in test["findings"] if f["kind"] == "task-leak"]
    assert leak["line"] == line_of("FIRE-AND-FORGET") and leak["request"] == "GET /fire"
    # the 30 s upstream call was cancelled: the whole run ended long before it would have
    assert result.duration < 30 / 2


def test_marker_pools_shrink_what_the_app_creates(app_dir: pytest.Pytester) -> None:
    app_dir.makepyfile(
        """
        import pytest
        from myapp import create_app

        @pytest.fixture
        def stall_app():
            return create_app()

        # 150 ms: above a thread start on a busy machine, below the shrunk pool's waits
        # (its third wave waits two 0.2 s calls)
        @pytest.mark.concurrency(pools={"threads": 2}, pool_wait_ms=150)
        async def test_shrunk(stall_client):
            r = await stall_client.burst("GET", "/thread", n=6)
            assert r.statuses[200] == 6

        @pytest.mark.concurrency(pool_wait_ms=150)
        async def test_default(stall_client):
            r = await stall_client.burst("GET", "/thread", n=6)
            assert r.statuses[200] == 6
        """
    )
    out = app_dir.path / "r.json"
    result = app_dir.runpytest("-p", "no:asyncio", f"--stall-report-json={out}")
    result.assert_outcomes(passed=1, failed=1)
    tests = {t["nodeid"].split("::")[1]: t for t in load_json(out)["tests"]}
    shrunk, default = tests["test_shrunk[asyncio]"], tests["test_default[asyncio]"]
    assert {f["kind"] for f in shrunk["findings"]} == {"threadpool-saturation"}
    assert default["findings"] == []
    (pool,) = [p for p in shrunk["pools"] if p["kind"] == "threadpool"]
    assert pool["size"] == 2 and pool["max_in_use"] == 2
    # six 0.2 s calls two at a time: three waves, so the burst's slowest request took at
    # least three sleeps (a sleep is never shorter than asked); with six threads, one wave
    slowest_shrunk, slowest_default = shrunk["bursts"][0]["max_ms"], default["bursts"][0]["max_ms"]
    assert slowest_shrunk >= 3 * 200
    assert slowest_shrunk > slowest_default


def test_shrink_pools_fixture_restores_the_limiter(app_dir: pytest.Pytester) -> None:
    app_dir.makepyfile(
        """
        import anyio.to_thread
        import pytest
        from myapp import create_app

        @pytest.fixture
        def stall_app():
            return create_app()

        async def test_it(stall_client, shrink_pools):
            limiter = anyio.to_thread.current_default_thread_limiter()
            before = limiter.total_tokens
            shrink_pools.threads(1)
            assert limiter.total_tokens == 1
            pytest.shared = (limiter, before)

        def test_after():
            limiter, before = pytest.shared
            assert limiter.total_tokens == before
        """
    )
    app_dir.runpytest("-p", "no:asyncio", "-p", "no:randomly").assert_outcomes(passed=2)
