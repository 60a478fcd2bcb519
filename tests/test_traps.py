"""Blocking-call traps, unit-tested on a small FastAPI app run in-process (no plugin
fixtures): every call family is caught in an ``async def`` endpoint with the right file,
line, function and request; the same call in a worker thread, through the async APIs, or
in the test's own code is not a finding."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import http.server
import inspect
import io
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from socket import getaddrinfo as early_getaddrinfo  # bound before install(): audit hook
from time import sleep as early_sleep  # bound before install(): NOT caught (documented)
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
import requests
from fastapi import FastAPI

from pytest_stallguard import context, patching, traps
from pytest_stallguard.errors import BlockingCallError
from pytest_stallguard.guard import Guard
from pytest_stallguard.model import Finding

from .conftest import BACKENDS

THIS_FILE = "tests/test_traps.py"
_SOURCE = Path(__file__).read_text().splitlines()


def line_of(marker: str) -> int:
    """The line carrying ``# at: <marker>`` in this file (no hard-coded numbers)."""
    tag = f"# at: {marker}"
    hits = [i for i, text in enumerate(_SOURCE, 1) if text.rstrip().endswith(tag)]
    assert len(hits) == 1, (marker, hits)
    return hits[0]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


class _Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"pong"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def loopback() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 in a thread (for requests / urllib / sockets)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# -- the app ---------------------------------------------------------------------------------


def make_app(tmp: Path, url: str) -> FastAPI:
    data = tmp / "data.txt"
    data.write_text("hello")
    host, port = url.removeprefix("http://").split(":")
    app = FastAPI()
    log = logging.getLogger(f"stallguard.test.{id(app)}")
    log.propagate = False
    log.setLevel(logging.INFO)

    # ---- broken: blocking calls in async endpoints
    @app.get("/sleep")
    async def sleep_async() -> dict[str, Any]:
        t0 = time.perf_counter()
        time.sleep(0.05)  # at: sleep
        return {"slept_ms": (time.perf_counter() - t0) * 1000}

    @app.get("/requests")
    async def requests_async() -> dict[str, Any]:
        return {"body": requests.get(url, timeout=5).text}  # at: requests

    @app.get("/socket")
    async def socket_async() -> dict[str, Any]:
        sock = socket.socket()
        try:
            sock.connect((host, int(port)))  # at: socket
        finally:
            sock.close()
        return {}

    @app.get("/dns")
    async def dns_async() -> dict[str, Any]:
        return {"n": len(socket.getaddrinfo("localhost", 80))}  # at: dns

    @app.get("/dns-early")
    async def dns_early() -> dict[str, Any]:
        return {"n": len(early_getaddrinfo("localhost", 80))}  # at: dns-early

    @app.get("/open")
    async def open_async() -> dict[str, Any]:
        with open(data) as f:  # at: open
            return {"text": f.read()}

    @app.get("/pathlib")
    async def pathlib_async() -> dict[str, Any]:
        return {"text": data.read_text()}  # at: pathlib

    @app.get("/os-read")
    async def os_read_async() -> dict[str, Any]:
        r, w = os.pipe()
        try:
            os.write(w, b"x")  # at: os-write
            return {"data": os.read(r, 1).decode()}  # at: os-read
        finally:
            os.close(r)
            os.close(w)

    @app.get("/sqlite")
    async def sqlite_async() -> dict[str, Any]:
        conn = sqlite3.connect(":memory:")  # at: sqlite-connect
        try:
            return {"one": conn.execute("select 1").fetchone()[0]}  # at: sqlite-execute
        finally:
            conn.close()

    @app.get("/subprocess")
    async def subprocess_async() -> dict[str, Any]:
        return {"rc": subprocess.run(["true"]).returncode}  # at: subprocess

    @app.get("/popen")
    async def popen_async() -> dict[str, Any]:
        proc = subprocess.Popen(["true"])  # at: popen
        return {"rc": proc.wait()}  # at: popen-wait

    @app.get("/system")
    async def system_async() -> dict[str, Any]:
        return {"rc": os.system("true")}  # at: system

    @app.get("/logging")
    async def logging_async() -> dict[str, Any]:
        log.info("hello")  # at: logging
        return {}

    @app.get("/early-sleep")
    async def early_sleep_async() -> dict[str, Any]:
        early_sleep(0.01)
        return {}

    @app.get("/swallow")
    async def swallow() -> dict[str, Any]:
        try:
            time.sleep(0.01)  # at: swallow
        except Exception:
            return {"swallowed": True}
        return {"swallowed": False}

    # ---- clean twins
    @app.get("/def/sleep")
    def sleep_def() -> dict[str, Any]:
        time.sleep(0.02)
        return {}

    @app.get("/def/everything")
    def everything_def() -> dict[str, Any]:
        return blocking_work(data, url)

    @app.get("/thread")
    async def in_thread() -> dict[str, Any]:
        return await anyio.to_thread.run_sync(blocking_work, data, url)

    @app.get("/asyncio-thread")
    async def in_asyncio_thread() -> dict[str, Any]:
        return await asyncio.to_thread(blocking_work, data, url)

    @app.get("/anyio-files")
    async def anyio_files() -> dict[str, Any]:
        text = await anyio.Path(data).read_text()
        async with await anyio.open_file(data) as f:
            text += await f.read()
        return {"text": text}

    @app.get("/cpu")
    async def cpu() -> dict[str, Any]:
        return {"n": sum(i * i for i in range(2000))}

    @app.get("/nothing")
    async def nothing() -> dict[str, Any]:
        await anyio.sleep(0)
        return {}

    @app.get("/console-log")
    async def console_log() -> dict[str, Any]:
        logging.getLogger("stallguard.test.console").warning("to the console")
        return {}

    # ---- wrappers stored on a class built while armed (the class is built per request)
    @app.get("/held/{name}")
    async def held(name: str) -> dict[str, Any]:
        module, attr, use = HELD[name]
        fn = getattr(module, attr)

        class Holder:
            f = fn

        out: dict[str, Any] = {"binds": inspect.ismethod(Holder().f)}
        for how, get in (("module", lambda: fn), ("class", lambda: Holder.f),
                         ("instance", lambda: Holder().f)):
            try:
                out[how] = ["ok", use(get(), data)]
            except Exception as exc:
                out[how] = ["error", type(exc).__name__]
        return out

    @app.get("/subclasses")
    async def subclasses() -> dict[str, Any]:
        class Sock(socket.socket):
            pass

        class Proc(subprocess.Popen):  # type: ignore[type-arg]
            pass

        class Handler(logging.StreamHandler):  # type: ignore[type-arg]
            pass

        sock = Sock()
        try:
            sock.settimeout(5)
            sock.connect((host, int(port)))
            peer = sock.getpeername()[0]
        finally:
            sock.close()
        proc = Proc(["true"])
        stream = io.StringIO()
        handler = Handler(stream)
        handler.handle(logging.makeLogRecord({"msg": "hi"}))
        return {"peer": peer, "rc": proc.wait(), "logged": stream.getvalue()}

    # ---- sqlite3 on a connection the app made earlier (lifespan-like): app.state.db
    @app.get("/sqlite-later")
    async def sqlite_later() -> dict[str, Any]:
        db = app.state.db
        db.execute("create table if not exists t (x)")  # at: later-create
        db.executemany("insert into t values (?)", [(1,), (2,)])  # at: later-many
        db.commit()  # at: later-commit
        cur = db.cursor()
        cur.executescript("select 1; select 2;")  # at: later-script
        return {"n": db.execute("select count(*) from t").fetchone()[0]}  # at: later-count

    @app.get("/sqlite-made")
    async def sqlite_made() -> dict[str, Any]:
        factory = app.state.factory
        conn = sqlite3.connect(":memory:") if factory is None else sqlite3.connect(
            ":memory:", factory=factory
        )
        app.state.made.append(conn)
        return {"type": type(conn).__qualname__, "one": conn.execute("select 1").fetchone()[0]}

    @app.get("/open-missing")
    async def open_missing() -> dict[str, Any]:
        try:
            with open(tmp / "missing.txt"):
                return {"opened": True}
        except FileNotFoundError as exc:  # the app's own exception, unchanged
            return {"errno": exc.errno, "name": Path(exc.filename).name}

    app.state.log = log
    app.state.made = []
    app.state.factory = None
    return app


def _read_with(f: Any, data: Path) -> str:
    with f(data) as fh:
        return str(fh.read())


def _pipe_read(f: Any, data: Path) -> str:
    r, w = os.pipe()
    try:
        os.write(w, b"x")
        return str(f(r, 1).decode())
    finally:
        os.close(r)
        os.close(w)


def _pipe_write(f: Any, data: Path) -> int:
    r, w = os.pipe()
    try:
        return int(f(w, b"xy"))
    finally:
        os.close(r)
        os.close(w)


def _sqlite_one(f: Any, data: Path) -> list[Any]:
    conn = f(":memory:")
    try:
        return [type(conn).__qualname__, conn.execute("select 1").fetchone()[0]]
    finally:
        conn.close()


# Every module-level callable the traps wrap, with a call of it that works when it is
# called the way the original can be called (through a class when it does not bind).
HELD: dict[str, tuple[Any, str, Any]] = {
    "time.sleep": (time, "sleep", lambda f, d: f(0.001)),
    "socket.getaddrinfo": (
        socket, "getaddrinfo", lambda f, d: sorted({a[4][0] for a in f("localhost", 80)})
    ),
    "socket.gethostbyname": (socket, "gethostbyname", lambda f, d: f("localhost")),
    "socket.gethostbyname_ex": (socket, "gethostbyname_ex", lambda f, d: f("localhost")[0]),
    "builtins.open": (builtins, "open", _read_with),
    "io.open": (io, "open", _read_with),
    "os.read": (os, "read", _pipe_read),
    "os.write": (os, "write", _pipe_write),
    "os.system": (os, "system", lambda f, d: f("true")),
    "sqlite3.connect": (sqlite3, "connect", _sqlite_one),
    "sqlite3.dbapi2.connect": (sqlite3.dbapi2, "connect", _sqlite_one),
    "subprocess.run": (subprocess, "run", lambda f, d: f(["true"]).returncode),
    "subprocess.call": (subprocess, "call", lambda f, d: f(["true"])),
    "subprocess.check_call": (subprocess, "check_call", lambda f, d: f(["true"])),
    "subprocess.check_output": (subprocess, "check_output", lambda f, d: f(["echo", "hi"]).decode()),
    "subprocess.getoutput": (subprocess, "getoutput", lambda f, d: f("echo hi")),
    "subprocess.getstatusoutput": (
        subprocess, "getstatusoutput", lambda f, d: list(f("echo hi"))
    ),
}


def blocking_work(data: Path, url: str) -> dict[str, Any]:
    """Every blocking family at once: fine in a worker thread."""
    time.sleep(0.001)
    text = data.read_text()
    requests.get(url, timeout=5)
    socket.getaddrinfo("localhost", 80)
    conn = sqlite3.connect(":memory:")
    conn.execute("select 1").fetchone()
    conn.close()
    subprocess.run(["true"])
    return {"text": text}


@contextlib.asynccontextmanager
async def armed(
    app: FastAPI, *, mode: str = "record", install: bool = True
) -> AsyncIterator[tuple[httpx.AsyncClient, Guard]]:
    transport = httpx.ASGITransport(app=context.attributed(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        with Guard(threshold_ms=20, traps=mode) as guard:
            if install:
                traps.install()
            try:
                yield client, guard
            finally:
                traps.uninstall()


def only(findings: list[Finding], kind: str = "blocking-call") -> list[Finding]:
    return [f for f in findings if f.kind == kind]


@pytest.fixture
def app(tmp_path: Path, loopback: str) -> Iterator[FastAPI]:
    application = make_app(tmp_path, loopback)
    yield application
    for handler in list(application.state.log.handlers):
        application.state.log.removeHandler(handler)
        handler.close()
    for conn in [*application.state.made, getattr(application.state, "db", None)]:
        if conn is not None:
            conn.close()


@contextlib.asynccontextmanager
async def plain(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The same client as :func:`armed`, with no trap and no guard: the app as it is."""
    transport = httpx.ASGITransport(app=context.attributed(app))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


# -- broken: one test per call family ------------------------------------------------------

FAMILIES = [
    # path, expected {(call, marker)}, function
    ("/sleep", {("time.sleep", "sleep")}, "sleep_async"),
    ("/requests", {("dns", "requests"), ("socket", "requests")}, "requests_async"),
    ("/socket", {("socket", "socket")}, "socket_async"),
    ("/dns", {("dns", "dns")}, "dns_async"),
    ("/dns-early", {("dns", "dns-early")}, "dns_early"),
    ("/open", {("open", "open")}, "open_async"),
    ("/pathlib", {("open", "pathlib")}, "pathlib_async"),
    ("/os-read", {("os.write", "os-write"), ("os.read", "os-read")}, "os_read_async"),
    (
        "/sqlite",
        {("sqlite3", "sqlite-connect"), ("sqlite3", "sqlite-execute")},
        "sqlite_async",
    ),
    ("/subprocess", {("subprocess", "subprocess")}, "subprocess_async"),
    ("/popen", {("subprocess", "popen"), ("subprocess", "popen-wait")}, "popen_async"),
    ("/system", {("os.system", "system")}, "system_async"),
    ("/logging", {("logging", "logging")}, "logging_async"),
]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("path", "expected", "function"), FAMILIES, ids=[f[0].strip("/") for f in FAMILIES]
)
async def test_blocking_call_in_async_endpoint_is_caught(
    app: FastAPI, tmp_path: Path, path: str, expected: set[tuple[str, str]], function: str
) -> None:
    if path == "/logging":
        app.state.log.addHandler(logging.FileHandler(tmp_path / "app.log"))
    async with armed(app) as (client, guard):
        response = await client.get(path)
    assert response.status_code == 200, response.text
    findings = only(guard.findings)
    got = {(f.call, f.line) for f in findings}
    assert got == {(call, line_of(marker)) for call, marker in expected}, findings
    for finding in findings:
        assert finding.file == THIS_FILE
        assert finding.function == function
        assert finding.request == f"GET {path}"
        assert f"during GET {path} at {THIS_FILE}:{finding.line} ({function})" in finding.message
        assert finding.message.endswith("#blocking-call")
    assert guard.findings == findings  # nothing else (FastAPI's first request is exempt)


@pytest.mark.anyio
async def test_sleep_duration_is_the_call_duration(app: FastAPI) -> None:
    async with armed(app) as (client, guard):
        t0 = time.perf_counter()
        response = await client.get("/sleep")
        around_ms = (time.perf_counter() - t0) * 1000
    (finding,) = guard.findings
    slept_ms = response.json()["slept_ms"]  # measured by the app around its own call
    assert finding.duration_ms is not None
    # time.sleep(0.05) never sleeps less; the trap measures inside the app's own clocks
    assert 50 <= finding.duration_ms <= slept_ms <= around_ms
    assert f"blocked the event loop for {finding.duration_ms:.1f} ms" in finding.message


@pytest.mark.anyio
async def test_repeats_fold_into_one_finding(app: FastAPI) -> None:
    async with armed(app) as (client, guard):
        for _ in range(3):
            await client.get("/open")
    (finding,) = guard.findings
    assert finding.count == 3  # the patch and the audit hook saw each call: counted once


@pytest.mark.anyio
async def test_record_mode_never_raises_into_the_app(app: FastAPI) -> None:
    async with armed(app) as (client, guard):
        response = await client.get("/swallow")
    assert response.status_code == 200
    assert response.json() == {"swallowed": False}
    (finding,) = guard.findings
    assert (finding.call, finding.line) == ("time.sleep", line_of("swallow"))


@pytest.mark.anyio
async def test_raise_mode_raises_at_the_call(app: FastAPI) -> None:
    async with armed(app, mode="raise") as (client, guard):
        with pytest.raises(BlockingCallError, match=r"time\.sleep\(\) was called on the event"):
            await client.get("/sleep")
        response = await client.get("/swallow")
    assert response.json() == {"swallowed": True}  # raised at the call, before sleeping
    lines = {f.line for f in guard.findings}
    assert lines == {line_of("sleep"), line_of("swallow")}


@pytest.mark.anyio
async def test_traps_off_records_nothing(app: FastAPI) -> None:
    async with armed(app, mode="off") as (client, guard):
        assert (await client.get("/sleep")).status_code == 200
    assert guard.findings == []


@pytest.mark.anyio
async def test_allowlist_drops_the_finding(app: FastAPI) -> None:
    async with armed(app) as (client, guard):
        guard.allow(f"{THIS_FILE}:sleep_async")
        await client.get("/sleep")
    assert guard.findings == []
    assert guard.suppressed == 1


@pytest.mark.anyio
async def test_paused_window_records_nothing(app: FastAPI) -> None:
    async with armed(app) as (client, guard):
        with guard.paused():
            await client.get("/sleep")
    assert guard.findings == []


@pytest.mark.anyio
async def test_name_bound_before_install_is_a_documented_miss(app: FastAPI) -> None:
    # ``from time import sleep`` keeps the original; CPython has no audit event for it.
    # (The loop watch still reports the stall if it is longer than the threshold.)
    async with armed(app) as (client, guard):
        await client.get("/early-sleep")
    assert guard.findings == []


# -- clean twins: zero findings ------------------------------------------------------------

CLEAN = [
    "/def/sleep",
    "/def/everything",
    "/thread",
    "/asyncio-thread",
    "/anyio-files",
    "/cpu",
    "/nothing",
    "/console-log",
]


@pytest.mark.anyio
@pytest.mark.parametrize("path", CLEAN, ids=[p.strip("/") for p in CLEAN])
async def test_clean_twin_has_no_finding(app: FastAPI, path: str, anyio_backend: Any) -> None:
    if path == "/asyncio-thread" and anyio_backend[0] == "trio":
        pytest.skip("asyncio.to_thread needs asyncio")
    async with armed(app) as (client, guard):
        for _ in range(2):  # the first request (FastAPI's inspection) and a warm one
            response = await client.get(path)
            assert response.status_code == 200, response.text
    assert guard.findings == []


@pytest.mark.anyio
async def test_the_tests_own_code_is_not_a_finding(app: FastAPI, tmp_path: Path) -> None:
    async with armed(app) as (_client, guard):
        time.sleep(0.01)
        (tmp_path / "x").write_text("x")
        socket.getaddrinfo("localhost", 80)
        conn = sqlite3.connect(":memory:")
        conn.execute("select 1")
        conn.close()
    assert guard.findings == []


@pytest.mark.anyio
async def test_nothing_without_a_guard(app: FastAPI) -> None:
    transport = httpx.ASGITransport(app=context.attributed(app))
    traps.install()
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/sleep")).status_code == 200
    finally:
        traps.uninstall()


@pytest.mark.anyio
async def test_burst_of_clean_requests(app: FastAPI) -> None:
    async with armed(app) as (client, guard):
        await client.get("/nothing")
        async with anyio.create_task_group() as tg:
            for _ in range(40):
                tg.start_soon(client.get, "/nothing")
    assert guard.findings == []


# -- install / uninstall -------------------------------------------------------------------


def _originals() -> dict[str, object]:
    return {
        "time.sleep": time.sleep,
        "builtins.open": builtins.open,
        "io.open": io.open,
        "os.read": os.read,
        "os.write": os.write,
        "os.system": os.system,
        "socket.getaddrinfo": socket.getaddrinfo,
        "socket.gethostbyname": socket.gethostbyname,
        "socket.gethostbyname_ex": socket.gethostbyname_ex,
        "sqlite3.connect": sqlite3.connect,
        "sqlite3.dbapi2.connect": sqlite3.dbapi2.connect,
        "subprocess.run": subprocess.run,
        "subprocess.check_output": subprocess.check_output,
        "subprocess.Popen.__init__": subprocess.Popen.__init__,
        "subprocess.Popen.wait": subprocess.Popen.wait,
        "logging.Handler.handle": logging.Handler.handle,
        **{f"socket.socket.{m}": getattr(socket.socket, m) for m in traps._SOCKET_METHODS},
    }


def _live_traps() -> list[patching.Live]:
    return [item for item in patching.live() if item.owner == traps.OWNER]


def test_install_patches_and_uninstall_restores_exactly() -> None:
    before = _originals()
    socket_dict = dict(vars(socket.socket))
    assert not _live_traps()
    traps.install()
    live = _live_traps()
    traps.install()  # idempotent
    try:
        assert _live_traps() == live
        assert {f"{item.target}.{item.name}" for item in live} >= {
            "time.sleep", "builtins.open", "sqlite3.connect", "socket.socket.connect"
        }
        during = _originals()
        assert all(during[name] is not before[name] for name in before), [
            name for name in before if during[name] is before[name]
        ]
    finally:
        traps.uninstall()
    traps.uninstall()  # idempotent
    assert not _live_traps()
    after = _originals()
    assert all(after[name] is before[name] for name in before)
    assert time.sleep is before["time.sleep"]
    assert builtins.open is io.open is before["builtins.open"]
    assert dict(vars(socket.socket)) == socket_dict  # shadowing attributes removed


def test_failed_install_restores_what_it_had_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    before = _originals()
    real = traps._patch_all

    def half_then_fail() -> None:
        real()
        raise RuntimeError("patching failed")

    monkeypatch.setattr(traps, "_patch_all", half_then_fail)
    with pytest.raises(RuntimeError, match="patching failed"):
        traps.install()
    assert not _live_traps()
    assert _originals() == before
    assert all(_originals()[name] is before[name] for name in before)


@pytest.mark.anyio
async def test_originals_back_after_an_exception_in_the_test(app: FastAPI) -> None:
    before = _originals()
    with pytest.raises(ZeroDivisionError):
        async with armed(app) as (client, _guard):
            await client.get("/sleep")
            1 / 0  # noqa: B018
    assert all(_originals()[name] is before[name] for name in before)


def test_exemption_list_names_modules() -> None:
    assert "inspect" in traps.EXEMPT_MODULES
    assert "importlib" in traps.EXEMPT_MODULES
    assert traps._module_exempt("importlib.metadata")
    assert not traps._module_exempt("importlibx")



# -- wrappers behave like what they replace ----------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
@pytest.mark.parametrize("name", list(HELD))
async def test_trap_stored_on_a_class_answers_as_without_the_plugin(
    app: FastAPI, name: str
) -> None:
    # ``class Holder: f = time.sleep`` built while armed, then ``Holder().f(0.001)``: a
    # builtin does not bind, so this works without the plugin and must work with it; a
    # Python function binds (and fails the same way with and without).
    async with plain(app) as client:
        without = await client.get(f"/held/{name}")
    async with armed(app) as (client, _guard):
        under = await client.get(f"/held/{name}")
    assert without.status_code == under.status_code == 200, under.text
    assert under.json() == without.json()
    module, attr, _ = HELD[name]
    if not hasattr(type(getattr(module, attr)), "__get__"):  # a builtin
        assert without.json()["instance"][0] == "ok"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
async def test_subclasses_built_while_armed_answer_as_without(app: FastAPI) -> None:
    async with plain(app) as client:
        without = await client.get("/subclasses")
    async with armed(app) as (client, guard):
        under = await client.get("/subclasses")
    assert without.status_code == under.status_code == 200, under.text
    assert under.json() == without.json() == {"peer": "127.0.0.1", "rc": 0, "logged": "hi\n"}
    assert {f.call for f in guard.findings} == {"socket", "subprocess"}  # still trapped


def _trapped_attributes() -> list[tuple[Any, str]]:
    return [
        (time, "sleep"),
        *[(socket.socket, m) for m in traps._SOCKET_METHODS],
        (socket, "getaddrinfo"),
        (socket, "gethostbyname"),
        (socket, "gethostbyname_ex"),
        (builtins, "open"),
        (io, "open"),
        (os, "read"),
        (os, "write"),
        (os, "system"),
        (sqlite3, "connect"),
        (sqlite3.dbapi2, "connect"),
        (subprocess.Popen, "__init__"),
        (subprocess.Popen, "wait"),
        (subprocess.Popen, "communicate"),
        *[(subprocess, f) for f in traps._SUBPROCESS_FUNCTIONS],
        (logging.Handler, "handle"),
        (threading.Thread, "start"),  # timed, not trapped: see test_thread_start.py
    ]


def _dotted(target: Any, name: str) -> str:
    where = target.__name__ if not isinstance(target, type) else (
        f"{target.__module__}.{target.__qualname__}"
    )
    return f"{where}.{name}"


def _signature(obj: Any) -> inspect.Signature | str:
    try:
        return inspect.signature(obj)
    except ValueError as exc:  # builtins without one (time.sleep in 3.11)
        return f"no signature: {type(exc).__name__}"


def _stays_itself(func: Any) -> bool:
    """Stored on a class, is it the same object on an instance (a builtin), or does it
    bind (a function: a bound method; a C method descriptor: bound, or a TypeError)?"""

    class Holder:
        f = func

    try:
        return Holder().f is func
    except TypeError:
        return False


def test_every_trap_keeps_signature_metadata_and_binding() -> None:
    attributes = _trapped_attributes()
    originals = {(t, n): getattr(t, n) for t, n in attributes}
    traps.install()
    try:
        live = {f"{item.target}.{item.name}" for item in _live_traps()}
        assert live - {"sys.audit.audit hook"} == {_dotted(t, n) for t, n in attributes}
        for (target, name), original in originals.items():
            trap = getattr(target, name)
            where = _dotted(target, name)
            assert trap is not original, where
            assert trap.__wrapped__ is original, where
            metadata = ["__name__", "__qualname__", "__doc__", "__module__"]
            if not hasattr(type(original), "__get__"):  # a builtin's own attributes too
                metadata += ["__self__", "__text_signature__"]
            for meta in metadata:
                if hasattr(original, meta):
                    assert getattr(trap, meta) == getattr(original, meta), (where, meta)
            assert _signature(trap) == _signature(original), where
            assert inspect.isroutine(trap) == inspect.isroutine(original), where
            # binds on a class exactly when the original does
            assert _stays_itself(trap) == _stays_itself(original), where
    finally:
        traps.uninstall()
    assert {(t, n): getattr(t, n) for t, n in attributes} == originals


def test_builtin_traps_pickle_as_the_builtins_do() -> None:
    import pickle

    traps.install()
    try:
        for func in (time.sleep, open, os.read, os.system, sqlite3.connect):
            back = pickle.loads(pickle.dumps(func))
            assert back is func or back is func.__wrapped__, func  # posix.read: the builtin
        assert pickle.loads(pickle.dumps(time.sleep)) is time.sleep
    finally:
        traps.uninstall()


def test_layers_of_other_owners_come_off_in_any_order() -> None:
    original = time.sleep
    other = patching.Patches("someone else")
    calls: list[str] = []

    def make(link: patching.Link) -> Any:
        def outer(seconds: float) -> None:
            calls.append("outer")
            link.next(seconds)

        return outer

    traps.install()
    other.wrap(time, "sleep", make)
    traps.uninstall()  # ours comes off from under the other layer
    time.sleep(0)
    assert calls == ["outer"]
    assert not _live_traps()
    other.restore()
    assert time.sleep is original


# -- sqlite3: statements caught, connections keep their type -----------------------------------


class PlainFactory(sqlite3.Connection):
    """A user's factory with no __init__ of its own."""


class TracingFactory(sqlite3.Connection):
    """A user's factory that sets its own trace callback (ours must never replace it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.statements: list[str] = []
        self.set_trace_callback(self.statements.append)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
@pytest.mark.parametrize("factory", [None, PlainFactory, TracingFactory])
async def test_sqlite_connection_keeps_its_type(app: FastAPI, factory: type | None) -> None:
    app.state.factory = factory
    expected = sqlite3.Connection if factory is None else factory
    async with armed(app) as (client, guard):
        response = await client.get("/sqlite-made")
        (conn,) = app.state.made
        assert type(conn) is expected  # during the test
    assert response.json() == {"type": expected.__qualname__, "one": 1}
    assert type(conn) is expected  # and after it
    assert {f.call for f in guard.findings} == {"sqlite3"}
    lines = {f.line for f in guard.findings}
    if factory is TracingFactory:
        # the user's callback stays: it saw the statement, and ours never replaced it
        assert isinstance(conn, TracingFactory)
        assert conn.statements == ["select 1"]
        conn.execute("select 2")
        assert conn.statements == ["select 1", "select 2"]
        assert len(lines) == 1  # the connect call only: we leave this connection alone
    else:
        assert len(lines) == 2  # connect and execute


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
async def test_sqlite_statements_on_an_earlier_connection_are_caught(app: FastAPI) -> None:
    async with armed(app) as (client, guard):
        app.state.db = sqlite3.connect(":memory:")  # made while armed, outside a request
        response = await client.get("/sqlite-later")
    assert response.json() == {"n": 2}
    assert type(app.state.db) is sqlite3.Connection
    got = {(f.call, f.line, f.function) for f in guard.findings}
    markers = ("later-create", "later-many", "later-commit", "later-script", "later-count")
    assert got == {("sqlite3", line_of(m), "sqlite_later") for m in markers}
    counts = {f.line: f.count for f in guard.findings}
    # one per statement run (executemany: per row); the deferred BEGIN sqlite3 issues
    # before the first insert takes no lock and is not counted
    assert counts[line_of("later-many")] == 2 and counts[line_of("later-script")] == 2
    for finding in guard.findings:
        assert finding.duration_ms is None
        assert "seen by sqlite3's trace callback, not timed" in finding.message
        assert finding.request == "GET /sqlite-later"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
async def test_a_trace_callback_the_user_sets_later_wins(app: FastAPI) -> None:
    async with armed(app) as (client, guard):
        db = app.state.db = sqlite3.connect(":memory:")
        seen: list[str] = []
        db.set_trace_callback(seen.append)
        response = await client.get("/sqlite-later")
    assert response.json() == {"n": 2}
    assert "select count(*) from t" in seen and seen[0] == "create table if not exists t (x)"
    assert guard.findings == []  # the user replaced ours: theirs gets every statement


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
async def test_the_trace_callback_is_inert_once_uninstalled(app: FastAPI) -> None:
    traps.install()
    app.state.db = sqlite3.connect(":memory:")  # gets our trace callback
    traps.uninstall()
    async with armed(app, install=False) as (client, guard):  # a guard, no traps
        assert (await client.get("/sqlite-later")).json() == {"n": 2}
    assert guard.findings == []
    assert type(app.state.db) is sqlite3.Connection


def test_sqlite_in_worker_threads_and_the_tests_own_code_is_not_a_finding() -> None:
    with Guard(traps="record") as guard:
        traps.install()
        try:
            conn = sqlite3.connect(":memory:", check_same_thread=False)
            conn.execute("select 1")
            thread = threading.Thread(target=conn.execute, args=("select 2",))
            thread.start()
            thread.join(5)
            with guard.only():  # a window the test opens: measured
                conn.execute("select 3")  # at: own-window
            conn.close()
        finally:
            traps.uninstall()
    assert [(f.call, f.line, f.request) for f in guard.findings] == [
        ("sqlite3", line_of("own-window"), "test")
    ]



# -- never raise into the app: every piece of our bookkeeping fails on purpose ------------------

# Where our bookkeeping can fail: deciding (is this a request on the loop?), the exemption
# walk, locating the user's line, recording the finding, and the audit hook's body.
FAILURE_POINTS: dict[str, tuple[Any, str]] = {
    "deciding": (context, "on_loop"),
    "exemption": (traps, "exempt"),
    "location": (traps, "user_location"),
    "recording": (Guard, "record"),
    "audit body": (traps, "_audit_check"),
}

# path, layer counting the app's call (target, attribute, the caller to count), and the
# (what, library) the warning names
FAILURE_CASES: dict[str, tuple[str, tuple[Any, str, str] | None, tuple[str, str]]] = {
    "builtin": ("/swallow", (time, "sleep", "swallow"), ("time.sleep", "time")),
    "function": (
        "/logging", (logging.Handler, "handle", "callHandlers"), ("logging handler", "logging")
    ),
    "app raises": ("/open-missing", (builtins, "open", "open_missing"), ("open", "io")),
    "audit only": ("/dns-early", None, ("the socket.getaddrinfo audit event", "socket")),
    "sqlite trace": ("/sqlite-later", None, ("sqlite3", "sqlite3")),
}

FAILURES = [
    pytest.param(point, case, id=f"{point}-{case}")
    for point in FAILURE_POINTS
    for case in FAILURE_CASES
    if (point == "audit body") == (case == "audit only") or (case == "audit only")
]


@pytest.fixture
def warnings_noted(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A fresh record of hook failures (each is noted once per process otherwise)."""
    patching.take_warnings()
    monkeypatch.setattr(patching, "_warned", set())
    yield
    patching.take_warnings()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
@pytest.mark.parametrize(("point", "case"), FAILURES)
@pytest.mark.parametrize("mode", ["record", "raise"])
async def test_our_failure_never_reaches_the_app(
    app: FastAPI,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    warnings_noted: None,
    point: str,
    case: str,
    mode: str,
) -> None:
    path, counted, (what, library) = FAILURE_CASES[case]
    if path == "/logging":
        app.state.log.addHandler(logging.FileHandler(tmp_path / "app.log"))
    if path == "/sqlite-later":
        app.state.db = sqlite3.connect(":memory:")
    async with plain(app) as client:
        without = [await client.get(path) for _ in range(2)]
    if path == "/sqlite-later":
        app.state.db.close()
        traps.install()  # the connection gets our trace callback, as in a real run
        app.state.db = sqlite3.connect(":memory:")
        traps.uninstall()

    callers: list[str] = []
    if counted is not None:  # a layer below ours: how often the app's call really ran
        target, attr, _ = counted
        below = getattr(target, attr)

        def counting(*args: Any, **kwargs: Any) -> Any:
            frame = sys._getframe(1)
            while frame.f_code.co_filename == traps.__file__:
                frame = frame.f_back  # type: ignore[assignment]
            if not (args and isinstance(args[0], logging.Handler)) or isinstance(
                args[0], logging.FileHandler
            ):  # pytest's own capture handlers are not the app's call
                callers.append(frame.f_code.co_name)
            return below(*args, **kwargs)

        monkeypatch.setattr(target, attr, counting)
    failed: list[str] = []
    owner, name = FAILURE_POINTS[point]

    def boom(*args: Any, **kwargs: Any) -> Any:
        failed.append(name)
        raise RuntimeError(f"forced failure in {name}")

    monkeypatch.setattr(owner, name, boom)
    async with armed(app, mode=mode) as (client, guard):
        under = [await client.get(path) for _ in range(2)]
    assert [r.status_code for r in under] == [r.status_code for r in without] == [200, 200]
    assert [r.json() for r in under] == [r.json() for r in without]
    if counted is not None:  # exactly once per request, as without the plugin
        assert callers.count(counted[2]) == 2, callers
    assert failed  # our code did fail ...
    notes = patching.take_warnings()  # ... and said so, once
    expected = f"stallguard: traps cannot watch {what} with {library} "
    assert [n for n in notes if n.startswith(expected)] != [], notes
    assert all(f"forced failure in {name}" in n for n in notes)
    assert guard.findings == []  # nothing half-recorded either


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
async def test_a_failed_trap_stays_off_until_the_next_install(
    app: FastAPI, monkeypatch: pytest.MonkeyPatch, warnings_noted: None
) -> None:
    failed: list[int] = []

    def boom(*args: Any, **kwargs: Any) -> Any:
        failed.append(1)
        raise RuntimeError("forced")

    monkeypatch.setattr(traps, "user_location", boom)
    async with armed(app) as (client, guard):
        for _ in range(3):
            assert (await client.get("/swallow")).json() == {"swallowed": False}
    assert len(failed) == 1 and guard.findings == []
    monkeypatch.undo()
    async with armed(app) as (client, guard):  # installed again: watching again
        await client.get("/swallow")
    assert [(f.call, f.line) for f in guard.findings] == [("time.sleep", line_of("swallow"))]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)
async def test_the_apps_exception_passes_through_unchanged(app: FastAPI) -> None:
    async with plain(app) as client:
        without = await client.get("/open-missing")
    async with armed(app) as (client, guard):
        under = await client.get("/open-missing")
    assert under.json() == without.json() == {"errno": 2, "name": "missing.txt"}
    (finding,) = guard.findings  # and the call was still a finding
    assert finding.call == "open" and finding.duration_ms is not None


# -- the fast path: process-wide wrappers cost nothing measurable with no guard ----------------


class _NoOpHandler(logging.Handler):
    """The cheapest handler there is: the worst case for the wrapper's share."""

    def emit(self, record: logging.LogRecord) -> None:
        pass


def _paired_ratio(call: Any, batch: int, rounds: int, arm: Any, disarm: Any) -> float:
    """Median over rounds of (time with traps installed) / (time without), batches
    interleaved so that a busy machine slows both sides of each pair alike."""
    import statistics
    import timeit

    ratios = []
    for _ in range(rounds):
        off = timeit.timeit(call, number=batch)
        arm()
        try:
            on = timeit.timeit(call, number=batch)
        finally:
            disarm()
        ratios.append(on / off)
    return statistics.median(ratios)


def test_wrappers_cost_nothing_measurable_with_no_guard(tmp_path: Path) -> None:
    # Why 3x: the fast path is one global check (and a context-variable read) in front of
    # the original call, about 0.1 us. Around open() (several us) and a StreamHandler's
    # handle() (formatting, a lock, a write: a few us) that is well under 1.5x even on a
    # busy machine, so 3x leaves room for noise and still fails if the fast path grows
    # real work: the trapped path (a request on the loop: decide, walk the stack, record)
    # is the control below, measured the same way, and comes out at 5-14x. Around a handler
    # whose emit() does nothing the wrapper is most of the call (1.4-2.2x here): printed,
    # not asserted, as no real handler costs that little.
    path = tmp_path / "f.txt"
    path.write_text("x")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # in memory: not a blocking handler
    noop = _NoOpHandler()
    record = logging.makeLogRecord({"msg": "m"})

    def open_close() -> None:
        open(path).close()

    def handle() -> None:
        handler.handle(record)
        stream.seek(0)
        stream.truncate()

    def handle_noop() -> None:
        noop.handle(record)

    ratios: dict[str, float] = {}
    calls = (("open", open_close, 500), ("Handler.handle", handle, 3000))
    for name, call, batch in calls:
        ratios[f"{name} idle"] = _paired_ratio(call, batch, 30, traps.install, traps.uninstall)
        with Guard(traps="record") as guard:  # armed, but the test's own code: not a request
            ratios[f"{name} guard, no request"] = _paired_ratio(
                call, batch, 30, traps.install, traps.uninstall
            )
    # shown, not asserted: a handler that does nothing, where the wrapper is all there is
    worst = _paired_ratio(handle_noop, 5000, 30, traps.install, traps.uninstall)
    with Guard(traps="record") as guard, guard.only():  # control: every open is trapped
        ratios["open trapped (control)"] = _paired_ratio(
            open_close, 200, 15, traps.install, traps.uninstall
        )
    print("armed/unpatched time ratios:", {k: round(v, 2) for k, v in ratios.items()})
    print(f"no-op handler (the wrapper alone, about 0.1 us a call): {worst:.2f}x")
    assert ratios["open trapped (control)"] > 1.5 * ratios["open idle"]  # it can tell
    for name, ratio in ratios.items():
        if "control" not in name:
            assert ratio < 3.0, (name, ratio)


def test_the_audit_hook_is_a_cheap_no_op_when_disarmed() -> None:
    import statistics
    import timeit

    def empty(event: str, args: tuple[Any, ...]) -> None:
        return None

    args = ("x",)
    samples = []
    for _ in range(30):  # interleaved: a busy machine slows both alike
        ours = timeit.timeit(lambda: traps._audit("open", args), number=5000)
        bare = timeit.timeit(lambda: empty("open", args), number=5000)
        samples.append(ours / bare)
    ratio = statistics.median(samples)
    print(f"disarmed audit hook vs an empty function: {ratio:.2f}x")
    assert ratio < 2.0  # one dict lookup and a flag in front of the return


@pytest.mark.parametrize("same_thread", [True, False])
def test_worker_thread_connections_get_no_trace_callback_they_cannot_use(
    same_thread: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    traced: list[tuple[str, str]] = []  # what reached the callback we attach, and where

    def recording(statement: str) -> None:
        traced.append((threading.current_thread().name, statement))

    monkeypatch.setattr(traps, "_sqlite_trace", recording)

    def worker() -> None:
        conn = sqlite3.connect(":memory:", check_same_thread=same_thread)
        conn.execute("select 'worker'")
        conn.close()

    traps.install()
    try:
        main = sqlite3.connect(":memory:")
        main.execute("select 'main'")
        thread = threading.Thread(target=worker, name="worker")
        thread.start()
        thread.join(5)
        main.close()
    finally:
        traps.uninstall()
    # the main thread runs the test's loop: traced. A worker thread's own connection never
    # runs on a loop: not traced (no cost); one it may hand over to the loop is.
    expected = [("MainThread", "select 'main'")]
    if not same_thread:
        expected.append(("worker", "select 'worker'"))
    assert traced == expected


def test_a_failure_watching_a_new_connection_leaves_it_working(
    monkeypatch: pytest.MonkeyPatch, warnings_noted: None
) -> None:
    def boom() -> bool:
        raise RuntimeError("forced failure in _loop_may_run_here")

    monkeypatch.setattr(traps, "_loop_may_run_here", boom)
    traps.install()
    try:
        conn = sqlite3.connect(":memory:", factory=PlainFactory)
    finally:
        traps.uninstall()
    assert type(conn) is PlainFactory
    assert conn.execute("select 41 + 1").fetchone() == (42,)
    conn.close()
    (note,) = patching.take_warnings()
    assert note.startswith("stallguard: traps cannot watch sqlite3 connections with sqlite3 ")
