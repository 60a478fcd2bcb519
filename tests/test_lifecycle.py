"""The plugin's own lifecycle: restored on interrupt, nothing held per test, one verdict."""

from __future__ import annotations

import asyncio
import builtins
import gc
import json
import socket
import threading
import time

import anyio.to_thread
import httpx
import pytest

from pytest_stallguard import patching
from pytest_stallguard.errors import StallFindings

APP = """
import time
from fastapi import FastAPI


def create_app():
    app = FastAPI()
    app.state.ballast = bytearray(1 << 20)  # 1 MiB of app state

    @app.get("/ok")
    async def ok():
        return {"ok": True}

    @app.get("/sleepy")
    async def sleepy():
        time.sleep(0.02)
        return {"ok": True}

    return app
"""


def _globals() -> tuple[object, ...]:
    """Everything of the process the detectors patch, by identity."""
    return (
        time.sleep,
        builtins.open,
        socket.getaddrinfo,
        socket.socket.connect,
        asyncio.events.Handle._run,
        threading.Thread.start,
        anyio.to_thread.run_sync,
        httpx.AsyncHTTPTransport.handle_async_request,
        httpx.ASGITransport.__init__,
    )


def _our_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if "stallguard" in t.name.lower()]


@pytest.mark.parametrize("where", ["sync", "async"])
def test_an_interrupted_run_restores_everything(pytester: pytest.Pytester, where: str) -> None:
    """A KeyboardInterrupt skips the test's teardown; the plugin restores all the same."""
    pytester.makepyfile(myapp=APP)
    pytester.syspathinsert()
    body = (
        """
        import pytest
        from myapp import create_app

        @pytest.fixture
        def stall_app():
            return create_app()

        async def test_interrupted(stall_client):
            await stall_client.get("/ok")
            raise KeyboardInterrupt

        async def test_never_runs(stall_client):
            pass
        """
        if where == "async"
        else """
        from starlette.testclient import TestClient
        from myapp import create_app

        def test_interrupted():
            with TestClient(create_app()) as client:
                client.get("/ok")
                raise KeyboardInterrupt

        def test_never_runs():
            pass
        """
    )
    pytester.makepyfile(**{f"test_{where}_interrupt": body})
    before = _globals()
    # pytest.main() in this process, as a script or an IDE would call it. In the async
    # case anyio's test runner raises the interrupt once more at session end, out of
    # pytest.main() itself, as a real Ctrl-C would end the process.
    try:
        reprec = pytester.inline_run("-p", "no:asyncio", "--stall-guard", no_reraise_ctrlc=True)
    except KeyboardInterrupt:
        assert where == "async"
        gc.collect()  # the runner's task that carried the interrupt goes now, not later
    else:
        assert reprec.ret == pytest.ExitCode.INTERRUPTED
        assert len(reprec.getcalls("pytest_keyboard_interrupt")) == 1
    assert _globals() == before
    assert patching.live() == []
    assert _our_threads() == []


def test_a_finding_recorded_at_shutdown_fails_its_test(pytester: pytest.Pytester) -> None:
    """Blocking in the app's shutdown (lifespan="fail") is judged after teardown."""
    pytester.makepyfile(
        myapp="""
        import time
        from contextlib import asynccontextmanager
        from fastapi import FastAPI

        @asynccontextmanager
        async def lifespan(app):
            yield
            time.sleep(0.02)  # SHUTDOWN-LINE

        def create_app():
            app = FastAPI(lifespan=lifespan)

            @app.get("/ok")
            async def ok():
                return {"ok": True}

            return app
        """
    )
    pytester.syspathinsert()
    pytester.makepyfile(
        test_it="""
        import pytest
        from myapp import create_app

        @pytest.fixture
        def stall_app():
            return create_app()

        @pytest.mark.concurrency(lifespan="fail")
        async def test_fails(stall_client):
            assert (await stall_client.get("/ok")).status_code == 200

        async def test_reports(stall_client):
            assert (await stall_client.get("/ok")).status_code == 200
        """
    )
    result = pytester.runpytest("-p", "no:asyncio", "--stall-report-json=r.json")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        ["*ERROR at teardown of test_fails*", "*blocking-call*time.sleep*during lifespan*"]
    )
    report = json.loads((pytester.path / "r.json").read_text())
    outcomes = {t["nodeid"].split("::")[-1]: t["outcome"] for t in report["tests"]}
    assert outcomes == {"test_fails[asyncio]": "error", "test_reports[asyncio]": "passed"}
    shutdown = [f for t in report["tests"] for f in t["findings"]]
    assert {f["request"] for f in shutdown} == {"lifespan"} and len(shutdown) == 2


MEMORY_CONFTEST = """
import gc
import json
import weakref

import httpx
import pytest

from myapp import create_app

APPS = weakref.WeakSet()
SAMPLES = []


@pytest.fixture
def stall_app():
    app = create_app()
    APPS.add(app)
    return app


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def plain_app():
    app = create_app()
    APPS.add(app)
    return app


FINISHED = []


def pytest_runtest_logfinish(nodeid):
    FINISHED.append(nodeid)
    if len(FINISHED) % 50 == 0:  # a full collection per test would dominate the run
        gc.collect()
        SAMPLES.append((len(APPS), len(gc.get_objects())))


def pytest_sessionfinish(session):
    with open("samples.json", "w") as f:
        json.dump(SAMPLES, f)
"""

MEMORY_TESTS = """
import httpx
import pytest


@pytest.mark.parametrize("i", range(300))
async def test_client(i, stall_client):
    assert (await stall_client.get("/ok")).status_code == 200


@pytest.mark.parametrize("i", range(300))
@pytest.mark.anyio
async def test_plain(i, plain_app):
    transport = httpx.ASGITransport(app=plain_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/ok")).status_code == 200
"""


def _samples(pytester: pytest.Pytester, *args: str) -> list[tuple[int, int]]:
    result = pytester.runpytest_subprocess("-p", "no:asyncio", "-q", *args, timeout=600)
    assert result.ret == 0, result.stdout.str()[-2000:]
    return [tuple(s) for s in json.loads((pytester.path / "samples.json").read_text())]


def _growth_per_test(samples: list[tuple[int, int]]) -> float:
    """Objects alive, growth per test from test 100 to test 300 (sampled every 50)."""
    assert len(samples) == 6
    return (samples[5][1] - samples[1][1]) / 200


def test_memory_per_test_is_flat_over_300_tests(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(myapp=APP)
    pytester.makeconftest(MEMORY_CONFTEST)
    pytester.makepyfile(test_memory=MEMORY_TESTS)
    pytester.syspathinsert()

    # Loop stalls are not what this measures: a loaded machine must not fail these tests.
    calm = "--stall-threshold-ms=5000"
    ours = _samples(pytester, "-k", "test_client", calm)
    # Each finished test frees its app (and with it its client and loop): at most the
    # one still referenced by pytest's last report is alive, never one per test.
    assert max(apps for apps, _ in ours) <= 2, ours[-5:]

    # The same plain tests with the guard armed in every test and without the plugin:
    # the guard adds no per-test growth of its own beyond a few records.
    guarded = _samples(pytester, "-k", "test_plain", "--stall-guard", calm)
    bare = _samples(pytester, "-k", "test_plain", "-p", "no:stallguard", "-p", "anyio")
    assert max(apps for apps, _ in guarded) <= 2
    assert _growth_per_test(guarded) <= _growth_per_test(bare) + 25, (
        _growth_per_test(guarded),
        _growth_per_test(bare),
    )


def test_findings_keep_no_traceback_of_the_test(pytester: pytest.Pytester) -> None:
    """The burst errors kept for the report are detached from their frames."""
    from pytest_stallguard.model import BurstResult, RequestError

    def fail() -> None:
        ballast = bytearray(1 << 20)  # noqa: F841 - held by the frame
        raise httpx.ReadTimeout("gave up")

    try:
        fail()
    except httpx.ReadTimeout as exc:
        error = exc
    from collections import Counter

    burst = BurstResult("GET", "/", 1, None, [1.0], [1.0], Counter(), [RequestError(0, "GET", "/", error)], 0.1)
    kept = burst.detached().errors[0].exception
    assert error.__traceback__ is not None
    assert kept.__traceback__ is None and str(kept) == "gave up"
    assert isinstance(kept, httpx.ReadTimeout)
    assert not isinstance(kept, StallFindings)
