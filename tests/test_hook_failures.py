"""A hook of ours that fails never reaches the app (pools and leak checks).

Each test breaks one piece of our bookkeeping on purpose and checks that the app's call
gives the same result as without the plugin, is made exactly once, that the failure is
noted once naming the library and its version, and that the hook is then off for that
object (the broken helper is not called again).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import sqlalchemy
from fastapi import FastAPI

from pytest_stallguard import patching
from pytest_stallguard.guard import Guard
from pytest_stallguard.leaks import LeakCheck
from pytest_stallguard.pools import PoolWatch, ShrinkPools
from pytest_stallguard.pools import httpx as httpx_pools
from pytest_stallguard.pools import sqlalchemy as sqlalchemy_pools
from pytest_stallguard.pools.common import WatchCore
from pytest_stallguard.pools.httpx import HttpxWatch
from pytest_stallguard.pools.sqlalchemy import SqlalchemyWatch
from pytest_stallguard.pools.threads import ThreadShrink, ThreadWatch
from pytest_stallguard.upstream import serve

from .conftest import asgi_client

pytestmark = pytest.mark.anyio


class Broken:
    """Stands in for a helper of ours and raises, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        raise RuntimeError("bookkeeping broken on purpose")


def fresh_notes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Where a test collects hook-failure notes (the once-per-process memory starts empty)."""
    monkeypatch.setattr(patching, "_warned", set())
    patching.take_warnings()
    return []


@pytest.fixture
def notes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    return fresh_notes(monkeypatch)


def broken(monkeypatch: pytest.MonkeyPatch, target: Any, name: str) -> Broken:
    stand_in = Broken()
    monkeypatch.setattr(target, name, stand_in)
    return stand_in


def named(notes: list[str], library: str, what: str) -> None:
    """Exactly one new note, naming the library, its version and the hook."""
    notes.extend(patching.take_warnings())
    version = patching.version_of(library)
    assert version != "(version unknown)"
    [note] = notes
    assert f"{library} {version}" in note
    assert what in note
    assert "bookkeeping broken on purpose" in note


# -- worker threads -----------------------------------------------------------------------


def threads_app(ran: list[int]) -> FastAPI:
    app = FastAPI()

    @app.get("/report")
    def report() -> dict[str, int]:  # a `def` endpoint: runs through to_thread.run_sync
        ran.append(1)
        return {"rows": 7}

    return app


@pytest.mark.parametrize("helper", ["_begin", "_started", "_ended", "_returned"])
async def test_worker_thread_watch(monkeypatch: pytest.MonkeyPatch, notes: list[str],
                                   helper: str) -> None:
    stand_in = broken(monkeypatch, ThreadWatch, helper)
    ran: list[int] = []
    async with asgi_client(threads_app(ran)) as client:
        with Guard(), PoolWatch():
            first = await client.get("/report")
            second = await client.get("/report")
    assert [first.json(), second.json()] == [{"rows": 7}] * 2
    assert len(ran) == 2  # the endpoint ran once per request
    assert stand_in.calls == 1  # then the hook was off
    named(notes, "anyio", "anyio.to_thread.run_sync")


async def test_worker_thread_shrink(monkeypatch: pytest.MonkeyPatch, notes: list[str]) -> None:
    stand_in = broken(monkeypatch, ThreadShrink, "_apply_current")
    ran: list[int] = []
    shrink = ShrinkPools()
    try:
        async with asgi_client(threads_app(ran)) as client:
            shrink.threads(2)
            assert (await client.get("/report")).json() == {"rows": 7}
            assert (await client.get("/report")).json() == {"rows": 7}
    finally:
        await shrink.aclose()
    assert len(ran) == 2
    assert stand_in.calls == 1
    named(notes, "anyio", "anyio.to_thread.run_sync")


# -- httpx --------------------------------------------------------------------------------


def upstream_app(client: httpx.AsyncClient, url: str) -> FastAPI:
    app = FastAPI()

    @app.get("/pay")
    async def pay() -> dict[str, Any]:
        try:
            response = await client.get(url)
        except httpx.HTTPError as exc:  # the app's own handling of its own errors
            return {"error": type(exc).__name__}
        return {"status": response.status_code}

    return app


@pytest.mark.parametrize("helper", ["_enter", "_leave"])
async def test_httpx_transport_watch(monkeypatch: pytest.MonkeyPatch, notes: list[str],
                                     helper: str) -> None:
    stand_in = broken(monkeypatch, HttpxWatch, helper)
    with serve() as server:
        async with httpx.AsyncClient(timeout=5.0) as upstream, asgi_client(
            upstream_app(upstream, server.url)
        ) as client:
            with Guard(), PoolWatch():
                first = await client.get("/pay")
                second = await client.get("/pay")
        assert len(server.calls) == 2  # one upstream call per request
    assert [first.json(), second.json()] == [{"status": 200}] * 2
    assert stand_in.calls == 1
    named(notes, "httpx", "httpx transport requests")


async def test_httpx_transport_error_path(monkeypatch: pytest.MonkeyPatch,
                                          notes: list[str]) -> None:
    """The app's own exception passes through unchanged when our error bookkeeping fails."""
    stand_in = broken(monkeypatch, HttpxWatch, "_failed")
    with serve() as server:
        url = server.url
    # The server is gone: connecting fails with the app's own ConnectError.
    async with httpx.AsyncClient(timeout=5.0) as upstream, asgi_client(
        upstream_app(upstream, url)
    ) as client:
        with Guard(), PoolWatch():
            response = await client.get("/pay")
    assert response.json() == {"error": "ConnectError"}
    assert stand_in.calls == 1
    named(notes, "httpx", "httpx transport requests")


def test_httpx_sync_transport_watch(monkeypatch: pytest.MonkeyPatch, notes: list[str]) -> None:
    stand_in = broken(monkeypatch, HttpxWatch, "_enter")
    with serve() as server, httpx.Client(timeout=5.0) as client, Guard(), PoolWatch():
        statuses = [client.get(server.url).status_code for _ in range(2)]
        assert len(server.calls) == 2
    assert statuses == [200, 200]
    assert stand_in.calls == 1
    named(notes, "httpx", "httpx transport requests")


async def test_httpcore_pool_wait(monkeypatch: pytest.MonkeyPatch, notes: list[str]) -> None:
    stand_in = broken(monkeypatch, httpx_pools, "_add_wait")
    with serve() as server:
        async with httpx.AsyncClient(timeout=5.0) as upstream, asgi_client(
            upstream_app(upstream, server.url)
        ) as client:
            with Guard(), PoolWatch():
                first = await client.get("/pay")
                second = await client.get("/pay")
        assert len(server.calls) == 2
    assert [first.json(), second.json()] == [{"status": 200}] * 2
    assert stand_in.calls == 1
    named(notes, "httpcore", "httpcore pool waits")


def per_request_app(tmp_path: Path) -> FastAPI:
    app = FastAPI()

    @app.get("/quote")
    async def quote() -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=3.0) as client:
            return {"read": client.timeout.read}

    @app.get("/orders")
    def orders() -> dict[str, Any]:
        engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'o.db'}", echo=False)
        try:
            with engine.connect() as conn:
                return {"one": conn.execute(sqlalchemy.text("select 1")).scalar(),
                        "echo": engine.echo}
        finally:
            engine.dispose()

    return app


@pytest.mark.parametrize(
    ("path", "expected", "library", "what"),
    [
        ("/quote", {"read": 3.0}, "httpx", "httpx client creation"),
        ("/orders", {"one": 1, "echo": False}, "sqlalchemy", "SQLAlchemy engine creation"),
    ],
)
async def test_client_per_request_hook(monkeypatch: pytest.MonkeyPatch, notes: list[str],
                                       tmp_path: Path, path: str, expected: dict[str, Any],
                                       library: str, what: str) -> None:
    stand_in = broken(monkeypatch, WatchCore, "created")
    async with asgi_client(per_request_app(tmp_path)) as client:
        with Guard() as g, PoolWatch():
            first = await client.get(path)
            second = await client.get(path)
    assert [first.json(), second.json()] == [expected] * 2
    assert stand_in.calls == 1
    assert g.findings == []
    named(notes, library, what)


async def test_httpx_shrink_of_new_pools(monkeypatch: pytest.MonkeyPatch,
                                         notes: list[str]) -> None:
    stand_in = broken(monkeypatch, httpx_pools, "limit_pool")
    with ShrinkPools() as shrink:
        shrink.apply({"httpx": 1})
        clients = [httpx.AsyncClient(limits=httpx.Limits(max_connections=9)) for _ in range(2)]
    for client in clients:
        assert client._transport._pool._max_connections == 9  # type: ignore[attr-defined]
        await client.aclose()
    assert stand_in.calls == 1
    named(notes, "httpcore", "httpcore pool creation (shrink)")


# -- SQLAlchemy ---------------------------------------------------------------------------


def db_app(engine: sqlalchemy.Engine) -> FastAPI:
    app = FastAPI()

    @app.get("/count")
    async def count() -> dict[str, Any]:
        with engine.connect() as conn:
            return {"one": conn.execute(sqlalchemy.text("select 1")).scalar()}

    return app


@pytest.mark.parametrize(
    ("target", "helper", "what"),
    [
        (SqlalchemyWatch, "_begin", "sqlalchemy Pool.connect"),
        (SqlalchemyWatch, "_connected", "sqlalchemy Pool.connect"),
        (SqlalchemyWatch, "_checked_in", "sqlalchemy checkin event"),
        (sqlalchemy_pools, "_add_opening", "sqlalchemy Pool._create_connection"),
    ],
)
async def test_sqlalchemy_watch(monkeypatch: pytest.MonkeyPatch, notes: list[str],
                                tmp_path: Path, target: Any, helper: str, what: str) -> None:
    stand_in = broken(monkeypatch, target, helper)
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        async with asgi_client(db_app(engine)) as client:
            with Guard(), PoolWatch() as watch:
                first = await client.get("/count")
                engine.pool.dispose()  # the next checkout opens a new DBAPI connection
                second = await client.get("/count")
                leftover = watch.checked_out()
        assert engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        engine.dispose()
    assert [first.json(), second.json()] == [{"one": 1}] * 2
    assert stand_in.calls == 1
    assert leftover == []
    named(notes, "sqlalchemy", what)


def test_sqlalchemy_shrink_of_new_pools(monkeypatch: pytest.MonkeyPatch, notes: list[str],
                                        tmp_path: Path) -> None:
    stand_in = broken(monkeypatch, sqlalchemy_pools, "_shrunk_arguments")
    engines = []
    with ShrinkPools() as shrink:
        shrink.apply({"sqlalchemy": 1})
        for name in ("a", "b"):
            engine = sqlalchemy.create_engine(
                f"sqlite:///{tmp_path / name}.db", pool_size=4, max_overflow=3, echo=False
            )
            engines.append(engine)
            with engine.connect() as conn:
                assert conn.execute(sqlalchemy.text("select 1")).scalar() == 1
    for engine in engines:
        assert (engine.pool.size(), engine.pool._max_overflow) == (4, 3)  # type: ignore[attr-defined]
        engine.dispose()
    assert stand_in.calls == 1
    named(notes, "sqlalchemy", "sqlalchemy QueuePool creation (shrink)")


# -- leak checks --------------------------------------------------------------------------


def spawning_app() -> FastAPI:
    app = FastAPI()
    ran: list[str] = []

    @app.get("/task")
    async def task() -> dict[str, Any]:
        async def work() -> int:
            ran.append("task")
            return 3

        return {"value": await asyncio.create_task(work()), "ran": len(ran)}

    @app.get("/thread")
    async def thread() -> dict[str, Any]:
        box: list[int] = []
        worker = threading.Thread(target=lambda: box.append(5))
        worker.start()
        await anyio.to_thread.run_sync(worker.join, 5.0)
        ran.append("thread")
        return {"value": box, "ran": len(ran)}

    return app


@pytest.mark.parametrize(
    ("path", "helper", "library", "what"),
    [
        ("/task", "_note_task", "asyncio", "loop.create_task"),
        ("/thread", "_note_thread", "python", "threading.Thread.start"),
    ],
)
async def test_leak_check_hooks(monkeypatch: pytest.MonkeyPatch, notes: list[str], path: str,
                                helper: str, library: str, what: str) -> None:
    stand_in = broken(monkeypatch, LeakCheck, helper)
    async with asgi_client(spawning_app()) as client:
        with Guard():
            leaks = LeakCheck().start()
            first = await client.get(path)
            second = await client.get(path)
            assert await leaks.check(grace_s=0.0) == []
    value = {"/task": 3, "/thread": [5]}[path]
    assert [first.json(), second.json()] == [{"value": value, "ran": 1},
                                             {"value": value, "ran": 2}]
    assert stand_in.calls == 1
    notes.extend(patching.take_warnings())
    [note] = notes
    # Standard-library hooks: the note names the hook (there is no distribution version).
    assert what in note and library in note
    assert "bookkeeping broken on purpose" in note


# -- a library whose internals moved --------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "helper", "library", "what"),
    [
        (HttpxWatch, "_install_waits", "httpcore", "httpcore pool waits"),
        (SqlalchemyWatch, "install", "sqlalchemy", "sqlalchemy pools (install)"),
    ],
)
async def test_watch_starts_without_what_it_cannot_install(
    monkeypatch: pytest.MonkeyPatch, notes: list[str], tmp_path: Path, target: Any,
    helper: str, library: str, what: str,
) -> None:
    """A private attribute that moved turns that part off; the rest still watches."""
    broken(monkeypatch, target, helper)
    ran: list[int] = []
    engine = sqlalchemy.create_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    app = threads_app(ran)
    app.mount("/db", db_app(engine))
    try:
        with serve() as server:
            async with httpx.AsyncClient(timeout=5.0) as upstream, asgi_client(app) as client:
                with Guard(), PoolWatch() as watch:
                    assert (await upstream.get(server.url)).status_code == 200
                    assert (await client.get("/report")).json() == {"rows": 7}
                    assert (await client.get("/db/count")).json() == {"one": 1}
    finally:
        engine.dispose()
    kinds = {s.kind for s in watch.stats()}
    assert {"threadpool", "httpx"} <= kinds  # still watched
    assert ("sqlalchemy" in kinds) == (library != "sqlalchemy")
    named(notes, library, what)
