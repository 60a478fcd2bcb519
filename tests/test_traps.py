"""Blocking-call traps, unit-tested on a small FastAPI app run in-process (no plugin
fixtures): every call family is caught in an ``async def`` endpoint with the right file,
line, function and request; the same call in a worker thread, through the async APIs, or
in the test's own code is not a finding."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import http.server
import io
import logging
import os
import socket
import sqlite3
import subprocess
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

    app.state.log = log
    return app


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
    assert 0.8 * slept_ms <= finding.duration_ms <= slept_ms <= around_ms
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
