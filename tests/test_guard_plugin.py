"""The guard through pytest: --stall-guard on an unchanged suite, windows, allowlist, modes."""

from __future__ import annotations

import contextlib
import inspect
import socket
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asgi_lifespan
import httpx
import pytest
from fastapi import FastAPI

from pytest_stallguard import context, intercept, patching

from .conftest import load_json

APP = '''
import time
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI


@asynccontextmanager
async def lifespan(app):
    time.sleep(0.03)  # LIFESPAN-LINE
    yield


def create_app(slow_startup=False):
    app = FastAPI(lifespan=lifespan if slow_startup else None)

    @app.get("/sleepy")
    async def sleepy():
        time.sleep(0.03)  # SLEEP-LINE
        return {"ok": True}

    @app.get("/threaded")
    def threaded():
        time.sleep(0.03)
        return {"ok": True}

    @app.get("/offloaded")
    async def offloaded():
        await anyio.to_thread.run_sync(time.sleep, 0.03)
        return {"ok": True}

    @app.get("/swallowed")
    async def swallowed():
        try:
            time.sleep(0.01)
        except Exception:
            return {"swallowed": True}
        return {"ok": True}

    return app
'''

SUITE = '''
import httpx
import pytest
from starlette.testclient import TestClient

from myapp import create_app


async def get(path, app=None):
    transport = httpx.ASGITransport(app=app or create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.get(path)


@pytest.mark.anyio
async def test_sleepy():
    assert (await get("/sleepy")).status_code == 200


@pytest.mark.anyio
async def test_threaded():
    assert (await get("/threaded")).status_code == 200


@pytest.mark.anyio
async def test_offloaded():
    assert (await get("/offloaded")).status_code == 200


@pytest.mark.anyio
async def test_own_code_blocks():
    import time
    time.sleep(0.03)  # the test's own code is not a finding


def test_sync_testclient():
    with TestClient(create_app()) as client:
        assert client.get("/sleepy").status_code == 200
'''


def line_of(source: str, marker: str) -> int:
    # pytester strips the source before writing it
    return next(i for i, line in enumerate(source.strip().splitlines(), 1) if marker in line)


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(myapp=APP, test_suite=SUITE)
    # starlette's TestClient warns that it wants httpx2; not what this test is about
    pytester.makeini("[pytest]\nfilterwarnings = ignore:Using `httpx` with\n")
    pytester.syspathinsert()
    return pytester


def test_unchanged_suite_passes_without_the_flag(suite: pytest.Pytester) -> None:
    suite.runpytest("-p", "no:asyncio", "-k", "not trio").assert_outcomes(passed=5)


def test_stall_guard_flag_finds_the_blocking_line(suite: pytest.Pytester) -> None:
    out = suite.path / "report.json"
    result = suite.runpytest(
        "-p", "no:asyncio", "-k", "not trio", "--stall-guard", f"--stall-report-json={out}"
    )
    result.assert_outcomes(passed=3, failed=2)
    sleep_line = line_of(APP, "SLEEP-LINE")
    result.stdout.fnmatch_lines(
        [
            f"*[[]blocking-call[]] time.sleep() blocked the event loop for * ms during GET "
            f"/sleepy at myapp.py:{sleep_line} (sleepy)*",
        ]
    )
    report = load_json(out)
    failed = {t["nodeid"].split("::")[1] for t in report["tests"] if t["outcome"] == "failed"}
    assert failed == {"test_sleepy[asyncio]", "test_sync_testclient"}
    for test in report["tests"]:
        for f in test["findings"]:
            assert (f["kind"], f["file"], f["line"], f["function"], f["request"]) == (
                "blocking-call", "myapp.py", sleep_line, "sleepy", "GET /sleepy"
            )


def test_originals_are_restored_after_every_test(suite: pytest.Pytester) -> None:
    before = (time.sleep, socket.getaddrinfo, socket.socket.connect, open)
    suite.runpytest("-p", "no:asyncio", "-k", "not trio", "--stall-guard")
    assert (time.sleep, socket.getaddrinfo, socket.socket.connect, open) == before


def test_findings_are_not_swallowed_by_the_app(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(myapp=APP)
    pytester.syspathinsert()
    pytester.makepyfile(
        """
        import pytest
        from myapp import create_app

        @pytest.fixture
        def stall_app():
            return create_app()

        async def test_it(stall_client):
            r = await stall_client.get("/swallowed")
            assert r.json() == {"ok": True}   # the app saw no exception
        """
    )
    result = pytester.runpytest("-p", "no:asyncio")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*[[]blocking-call[]]*during GET /swallowed*"])


def test_raise_mode_raises_at_the_call(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(myapp=APP)
    pytester.syspathinsert()
    pytester.makepyfile(
        """
        import pytest
        from myapp import create_app

        @pytest.fixture
        def stall_app():
            return create_app()

        @pytest.mark.concurrency(traps="raise")
        async def test_it(stall_client):
            r = await stall_client.get("/sleepy")
            assert r.status_code == 500   # BlockingCallError raised in the endpoint
        """
    )
    result = pytester.runpytest("-p", "no:asyncio")
    result.assert_outcomes(failed=1)  # and still failed by the recorded finding
    result.stdout.fnmatch_lines(["*[[]blocking-call[]]*GET /sleepy*"])


@pytest.mark.parametrize(
    ("how", "outcome"),
    [
        ("ini", {"passed": 1}),
        ("marker", {"passed": 1}),
        ("call", {"passed": 1}),
        ("paused", {"passed": 1}),
        ("none", {"failed": 1}),
    ],
)
def test_allow_and_pause(pytester: pytest.Pytester, how: str, outcome: dict[str, int]) -> None:
    pytester.makepyfile(myapp=APP)
    pytester.syspathinsert()
    if how == "ini":
        pytester.makeini("[pytest]\nstallguard_allow =\n    myapp.sleepy\n")
    marker = '@pytest.mark.concurrency(allow=["myapp.py:sleepy"])' if how == "marker" else ""
    allow = 'stall_guard.allow("myapp.slee*")' if how == "call" else "pass"
    body = (
        "with stall_guard.paused():\n                r = await stall_client.get('/sleepy')"
        if how == "paused"
        else "r = await stall_client.get('/sleepy')"
    )
    pytester.makepyfile(
        f"""
        import pytest
        from myapp import create_app

        @pytest.fixture
        def stall_app():
            return create_app()

        {marker}
        async def test_it(stall_client, stall_guard):
            {allow}
            {body}
            assert r.status_code == 200
        """
    )
    pytester.runpytest("-p", "no:asyncio").assert_outcomes(**outcome)


def test_only_window_measures_the_tests_own_code(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import time

        async def test_window(stall_guard):
            time.sleep(0.01)          # outside the window: not measured
            with stall_guard.only():
                time.sleep(0.01)      # inside: measured
        """
    )
    result = pytester.runpytest("-p", "no:asyncio")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*[[]blocking-call[]] time.sleep()*during test at*:6 (test_window)*"])


@pytest.mark.parametrize(("mode", "outcome"), [("report", "passed"), ("fail", "failed")])
def test_lifespan_blocking_is_reported_and_fails_only_on_request(
    pytester: pytest.Pytester, mode: str, outcome: str
) -> None:
    pytester.makepyfile(myapp=APP)
    pytester.syspathinsert()
    pytester.makepyfile(
        f"""
        import pytest
        from myapp import create_app

        @pytest.fixture
        def stall_app():
            return create_app(slow_startup=True)

        @pytest.mark.concurrency(lifespan="{mode}")
        async def test_it(stall_client):
            assert (await stall_client.get("/threaded")).status_code == 200
        """
    )
    out = pytester.path / "r.json"
    result = pytester.runpytest("-p", "no:asyncio", f"--stall-report-json={out}")
    result.assert_outcomes(**{outcome: 1})
    (test,) = load_json(out)["tests"]
    (finding,) = test["findings"]
    assert (finding["request"], finding["line"]) == ("lifespan", line_of(APP, "LIFESPAN-LINE"))


@pytest.mark.parametrize(
    "backend",
    ['"trio"', '("asyncio", {"use_uvloop": True})', '"asyncio"'],
    ids=["trio", "uvloop", "asyncio"],
)
def test_stall_client_and_guard_on_every_backend(pytester: pytest.Pytester, backend: str) -> None:
    pytester.makepyfile(myapp=APP)
    pytester.syspathinsert()
    pytester.makepyfile(
        f"""
        import pytest
        from myapp import create_app

        @pytest.fixture
        def anyio_backend():
            return {backend}

        @pytest.fixture
        def stall_app():
            return create_app()

        async def test_blocking(stall_client):
            assert (await stall_client.get("/sleepy")).status_code == 200

        async def test_clean(stall_client):
            r = await stall_client.burst("GET", "/offloaded", n=10, canary="/threaded")
            assert r.statuses[200] == 10
        """
    )
    out = pytester.path / "r.json"
    result = pytester.runpytest("-p", "no:asyncio", f"--stall-report-json={out}")
    result.assert_outcomes(passed=1, failed=1)
    tests = {t["nodeid"].split("::")[1]: t for t in load_json(out)["tests"]}
    (finding,) = tests["test_blocking"]["findings"]
    assert (finding["kind"], finding["line"], finding["request"]) == (
        "blocking-call", line_of(APP, "SLEEP-LINE"), "GET /sleepy"
    )
    assert tests["test_clean"]["findings"] == []


@pytest.mark.parametrize("mode", ["strict", "auto"])
def test_stall_guard_flag_in_a_pytest_asyncio_suite(pytester: pytest.Pytester, mode: str) -> None:
    pytester.makepyfile(myapp=APP)
    pytester.syspathinsert()
    pytester.makepyfile(
        """
        import httpx
        import pytest
        from myapp import create_app

        @pytest.mark.asyncio
        async def test_sleepy():
            transport = httpx.ASGITransport(app=create_app())
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get("/sleepy")).status_code == 200

        @pytest.mark.asyncio
        async def test_offloaded():
            transport = httpx.ASGITransport(app=create_app())
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get("/offloaded")).status_code == 200
        """
    )
    result = pytester.runpytest(
        "-p", "asyncio", f"--asyncio-mode={mode}",
        "-o", "asyncio_default_fixture_loop_scope=function", "--stall-guard",
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*[[]blocking-call[]] time.sleep()*during GET /sleepy*"])


# -- request interception, in-process: constructors keep their signature and never break ------

with warnings.catch_warnings():  # starlette's TestClient warns that it wants httpx2
    warnings.simplefilter("ignore")
    import starlette.testclient

CONSTRUCTORS = [httpx.ASGITransport, asgi_lifespan.LifespanManager, starlette.testclient.TestClient]


def small_app() -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.started = True
        yield

    app = FastAPI(lifespan=lifespan)
    app.state.started = False

    @app.get("/ok")
    async def ok() -> dict[str, bool]:
        return {"ok": True}

    return app


@pytest.fixture
def intercepting() -> Iterator[None]:
    intercept.install()
    try:
        yield
    finally:
        intercept.uninstall()


@pytest.fixture
def warnings_noted(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    patching.take_warnings()
    monkeypatch.setattr(patching, "_warned", set())
    yield
    patching.take_warnings()


@pytest.mark.parametrize("cls", CONSTRUCTORS, ids=lambda c: c.__name__)
def test_wrapped_constructors_keep_signature_and_metadata(cls: type) -> None:
    original = vars(cls)["__init__"]
    signatures = (inspect.signature(cls.__init__), inspect.signature(cls))
    intercept.install()
    try:
        live = patching.live()
        assert {i.owner for i in live} == {intercept.OWNER}
        assert [i.name for i in live].count("__init__") == len(CONSTRUCTORS)
        wrapper = cls.__init__
        assert wrapper is not original and wrapper.__wrapped__ is original
        assert (inspect.signature(cls.__init__), inspect.signature(cls)) == signatures
        for meta in ("__name__", "__qualname__", "__doc__", "__module__"):
            assert getattr(wrapper, meta) == getattr(original, meta), meta
    finally:
        intercept.uninstall()
    assert vars(cls)["__init__"] is original
    assert not patching.live()


def _built(app: FastAPI) -> list[dict[str, Any]]:
    """What the constructors make of the same arguments (the app itself aside)."""
    transport = httpx.ASGITransport(app, raise_app_exceptions=False, root_path="/r",
                                    client=("1.2.3.4", 5))
    by_name = httpx.ASGITransport(app=app, root_path="/s")
    manager = asgi_lifespan.LifespanManager(app, startup_timeout=3, shutdown_timeout=4)
    return [
        {k: v for k, v in vars(obj).items() if k != "app" and not k.startswith("_")}
        | {"timeouts": (getattr(obj, "_startup_timeout", None), getattr(obj, "_shutdown_timeout", None))}
        for obj in (transport, by_name, manager)
    ]


@pytest.mark.anyio
async def test_arguments_pass_through_untouched(intercepting: None) -> None:
    app = small_app()
    under = _built(app)
    transport = httpx.ASGITransport(app)
    assert transport.app is not app and transport.app.__wrapped__ is app  # labelled
    intercept.uninstall()
    assert _built(app) == under
    with pytest.raises(TypeError) as plain:
        httpx.ASGITransport(app, nonsense=1)  # type: ignore[call-arg]
    intercept.install()
    with pytest.raises(TypeError) as wrapped:
        httpx.ASGITransport(app, nonsense=1)  # type: ignore[call-arg]
    assert str(wrapped.value) == str(plain.value)


@pytest.mark.anyio
async def test_a_failure_of_ours_leaves_every_client_working(
    intercepting: None, warnings_noted: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed: list[str] = []

    def boom(app: Any, **kwargs: Any) -> Any:
        failed.append("attributed")
        raise RuntimeError("forced failure in attributed")

    monkeypatch.setattr(context, "attributed", boom)
    app = small_app()
    for _ in range(2):  # the second time the constructor does not even try
        transport = httpx.ASGITransport(app=app)
        assert transport.app is app
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/ok")).json() == {"ok": True}
        async with asgi_lifespan.LifespanManager(app) as manager:
            assert app.state.started
            assert not getattr(manager.app, "__stallguard_wrapped__", False)  # untouched
        with starlette.testclient.TestClient(app) as test_client:
            assert test_client.get("/ok").json() == {"ok": True}
    assert len(failed) == 3  # once per constructor, then off for it
    notes = patching.take_warnings()
    for what, library in (
        ("httpx.ASGITransport", "httpx"),
        ("asgi_lifespan.LifespanManager", "asgi-lifespan"),
        ("starlette.testclient.TestClient", "starlette"),
    ):
        expected = f"stallguard: request labels cannot watch {what} with {library} "
        assert any(n.startswith(expected) for n in notes), notes


def test_install_again_after_everything_was_taken_off() -> None:
    intercept.install()
    patching.restore_all()  # what an interrupted run does
    assert vars(httpx.ASGITransport)["__init__"].__name__ == "__init__"
    assert not hasattr(vars(httpx.ASGITransport)["__init__"], "__wrapped__")
    intercept.install()  # wraps again, not "already done"
    try:
        assert hasattr(vars(httpx.ASGITransport)["__init__"], "__wrapped__")
    finally:
        intercept.uninstall()


def test_other_layers_on_a_constructor_come_off_in_any_order() -> None:
    original = vars(httpx.ASGITransport)["__init__"]
    other = patching.Patches("someone else")
    seen: list[Any] = []

    def make(link: patching.Link) -> Any:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            seen.append(kwargs.get("app"))
            link.next(self, *args, **kwargs)

        return __init__

    intercept.install()
    other.wrap(httpx.ASGITransport, "__init__", make)
    app = small_app()
    assert httpx.ASGITransport(app=app).app.__wrapped__ is app  # both layers ran
    intercept.uninstall()  # ours first, from under the other
    assert httpx.ASGITransport(app=app).app is app
    assert seen == [app, app]
    other.restore()
    assert vars(httpx.ASGITransport)["__init__"] is original
