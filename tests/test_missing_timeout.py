"""``missing-timeout`` is judged at the httpx transport, for every outbound call of a
request: a real loopback server, a respx fake, async and sync clients alike, and a
``Timeout(None, connect=2.0)`` (reads unbounded) as much as ``timeout=None``."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from pytest_stallguard import patching
from pytest_stallguard.guard import Guard
from pytest_stallguard.pools import PoolWatch
from pytest_stallguard.pools.httpx import HttpxWatch
from pytest_stallguard.upstream import MISSING_TIMEOUT_HELP, serve

from .conftest import asgi_client, load_json

APP = '''
import httpx
from contextlib import asynccontextmanager
from fastapi import FastAPI

TIMEOUTS = {
    "none": None,
    "connect-only": httpx.Timeout(None, connect=2.0),
    "bounded": httpx.Timeout(5.0),
}


def create_app(url, timeout):
    sync_client = httpx.Client(timeout=TIMEOUTS[timeout])

    @asynccontextmanager
    async def lifespan(app):
        with sync_client:
            async with httpx.AsyncClient(timeout=TIMEOUTS[timeout]) as client:
                app.state.http = client
                yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/quote")
    async def quote():
        reply = await app.state.http.get(url)  # ASYNC-CALL
        return {"status": reply.status_code}

    @app.get("/sync-quote")
    def sync_quote():
        reply = sync_client.get(url)  # THREAD-CALL
        return {"status": reply.status_code}

    return app
'''


def line_of(marker: str) -> int:
    return next(i for i, line in enumerate(APP.strip().splitlines(), 1) if marker in line)


@pytest.fixture
def app_dir(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(myapp=APP.strip() + "\n")
    pytester.syspathinsert()
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict[str, Any]]:
    out = pytester.path / "r.json"
    result = pytester.runpytest("-p", "no:asyncio", f"--stall-report-json={out}", *args)
    report = load_json(out)
    # the backend's id ("asyncio") dropped: test_quote[none-asyncio] -> test_quote[none]
    return result, {
        t["nodeid"].rpartition("::")[2].replace("-asyncio]", "]").replace("[asyncio]", ""): t
        for t in report["tests"]
    }


def missing(test: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in test["findings"] if f["kind"] == "missing-timeout"]


def test_loopback_server_untimed_connect_only_and_bounded(app_dir: pytest.Pytester) -> None:
    """A real loopback server: timeout=None and Timeout(None, connect=2.0) are findings at
    the app's line, named in the failure text; the bounded twin is clean; the test's own
    untimed call outside a request is not a finding."""
    app_dir.makepyfile(
        """
        import httpx
        import pytest
        from myapp import create_app

        @pytest.fixture(params=["none", "connect-only", "bounded"])
        def stall_app(request, slow_upstream):
            server = slow_upstream.serve(delay=0.01, json={"ok": True})
            return create_app(server.url, request.param)

        async def test_quote(stall_client):
            r = await stall_client.burst("GET", "/quote", n=3)
            assert r.statuses[200] == 3

        async def test_own_untimed_call_is_not_a_finding(slow_upstream):
            server = slow_upstream.serve(delay=0.01)
            async with httpx.AsyncClient(timeout=None) as client:
                assert (await client.get(server.url)).status_code == 200
        """
    )
    result, tests = run(app_dir)
    result.assert_outcomes(passed=2, failed=2)
    line = line_of("ASYNC-CALL")
    result.stdout.fnmatch_lines([f"*myapp.py:{line} (quote)*no timeout at all*"])
    result.stdout.fnmatch_lines([f"*myapp.py:{line} (quote)*no timeout for its read, write and pool phases*"])

    for param in ("none", "connect-only"):
        [finding] = missing(tests[f"test_quote[{param}]"])
        assert (finding["file"], finding["line"], finding["function"]) == (
            "myapp.py", line, "quote"
        )
        assert (finding["request"], finding["count"]) == ("GET /quote", 3)
        assert f"myapp.py:{line} (quote)" in finding["message"]
        assert MISSING_TIMEOUT_HELP in finding["message"]
    [connect_only] = missing(tests["test_quote[connect-only]"])
    assert "no timeout for its read, write and pool phases (only connect=2.0)" in connect_only["message"]
    assert tests["test_quote[bounded]"]["findings"] == []
    assert tests["test_own_untimed_call_is_not_a_finding"]["findings"] == []


@pytest.mark.parametrize("timeout", ["none", "connect-only"])
def test_fake_upstream_call_is_reported_once(app_dir: pytest.Pytester, timeout: str) -> None:
    """Through the respx fake the transport sees the call too: one finding, one count per
    call, with the line in the message, not one from each."""
    app_dir.makepyfile(
        f"""
        import pytest
        from myapp import create_app

        @pytest.fixture
        def stall_app():
            return create_app("https://quotes.example/q", {timeout!r})

        async def test_quote(stall_client, slow_upstream):
            up = slow_upstream("https://quotes.example", delay=0.01)
            r = await stall_client.burst("GET", "/quote", n=3)
            assert r.statuses[200] == 3
            assert len(up.calls) == 4  # and the burst's unmeasured warm-up call
        """
    )
    result, tests = run(app_dir)
    result.assert_outcomes(failed=1)
    assert "AssertionError" not in result.stdout.str()  # only the finding failed it
    [finding] = missing(tests["test_quote"])
    assert (finding["line"], finding["count"]) == (line_of("ASYNC-CALL"), 3)
    assert f"myapp.py:{line_of('ASYNC-CALL')} (quote)" in finding["message"]
    assert "https://quotes.example/q" in finding["message"]


def test_sync_client_in_a_def_endpoint(app_dir: pytest.Pytester) -> None:
    """A `def` endpoint's call runs in a worker thread: an unbounded call there is still a
    missing-timeout of the request that made it (the bounded twin stays clean)."""
    app_dir.makepyfile(
        """
        import pytest
        from myapp import create_app

        @pytest.fixture(params=["none", "bounded"])
        def stall_app(request, slow_upstream):
            server = slow_upstream.serve(delay=0.01)
            return create_app(server.url, request.param)

        async def test_sync_quote(stall_client):
            r = await stall_client.burst("GET", "/sync-quote", n=2)
            assert r.statuses[200] == 2
        """
    )
    result, tests = run(app_dir)
    result.assert_outcomes(passed=1, failed=1)
    [finding] = missing(tests["test_sync_quote[none]"])
    assert (finding["file"], finding["line"], finding["function"], finding["request"]) == (
        "myapp.py", line_of("THREAD-CALL"), "sync_quote", "GET /sync-quote"
    )
    assert finding["count"] == 2
    assert tests["test_sync_quote[bounded]"]["findings"] == []


# -- our bookkeeping never reaches the app ---------------------------------------------


def quote_app(client: httpx.AsyncClient, url: str) -> FastAPI:
    app = FastAPI()

    @app.get("/quote")
    async def quote() -> dict[str, Any]:
        return {"status": (await client.get(url)).status_code}

    return app


@pytest.mark.anyio
async def test_a_failing_timeout_judgement_is_noted_not_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []

    def broken(*args: Any) -> None:
        calls.append(args)
        raise RuntimeError("bookkeeping broken on purpose")

    monkeypatch.setattr(patching, "_warned", set())
    patching.take_warnings()
    monkeypatch.setattr(HttpxWatch, "_judge_timeout", broken)
    with serve() as server:
        async with httpx.AsyncClient(timeout=None) as upstream, asgi_client(
            quote_app(upstream, server.url)
        ) as client:
            with Guard() as g, PoolWatch():
                replies = [(await client.get("/quote")).json() for _ in range(2)]
        assert len(server.calls) == 2
    assert replies == [{"status": 200}] * 2
    assert len(calls) == 1  # off for that transport after its first failure
    [note] = patching.take_warnings()
    assert "httpx call timeouts" in note and "bookkeeping broken on purpose" in note
    assert g.findings == []
