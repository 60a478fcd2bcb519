"""Teardown leak checks: tasks, worker threads, DB connections, wedged httpx pools."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

from pytest_stallguard import context, patching
from pytest_stallguard.guard import Guard
from pytest_stallguard.leaks import LeakCheck
from pytest_stallguard.loopwatch import steps
from pytest_stallguard.pools import PoolWatch
from pytest_stallguard.upstream import SlowUpstreams, serve

from .conftest import ASYNCIO, BOTH, asgi_client, line_of

pytestmark = pytest.mark.anyio


# Task leaks are an asyncio matter: on trio a task cannot outlive its nursery. SQLAlchemy's
# async engines run on asyncio only.




# -- tasks --------------------------------------------------------------------------------

NOTIFY_DELAY = 30.0


def order_app(client: httpx.AsyncClient) -> FastAPI:
    app = FastAPI()
    app.state.tasks = set()

    async def notify() -> None:
        await client.post("https://mail.example/send")  # takes NOTIFY_DELAY seconds

    @app.post("/order")
    async def order() -> dict[str, bool]:
        task = asyncio.create_task(notify())  # fire and forget
        app.state.tasks.add(task)
        return {"ok": True}

    @app.post("/order-fixed")
    async def order_fixed() -> dict[str, bool]:
        with anyio.fail_after(1):
            await client.post("https://mail.example/quick")
        return {"ok": True}

    return app


@ASYNCIO
async def test_fire_and_forget_task_is_reported_and_cancelled(upstreams: SlowUpstreams) -> None:
    mail = upstreams("https://mail.example", delay=NOTIFY_DELAY)
    upstreams("https://mail.example/quick")
    async with httpx.AsyncClient(timeout=60.0) as mail_client:
        app = order_app(mail_client)
        async with asgi_client(app) as client:
            with Guard(threshold_ms=50) as g:
                leaks = LeakCheck().start()
                assert (await client.post("/order")).status_code == 200
                started = context.perf_counter()
                found = await leaks.check(grace_s=0.3)
                teardown_s = context.perf_counter() - started
    assert teardown_s < NOTIFY_DELAY / 5  # the 30 s call did not hold up teardown
    [task] = app.state.tasks
    assert task.cancelled()
    assert mail.cancelled == 1
    assert found == g.findings
    [finding] = found
    assert finding.kind == "task-leak"
    assert finding.request == "POST /order"
    assert finding.file == "tests/test_leaks.py"
    assert finding.function == "order"
    assert finding.line == line_of(order_app, "asyncio.create_task(notify())")
    assert "notify" in finding.message
    now_at = line_of(order_app, "# takes NOTIFY_DELAY")
    assert f"tests/test_leaks.py:{now_at} (notify)" in finding.message  # where it was
    assert leaks.cancelled_tasks == 1


@ASYNCIO
async def test_awaited_work_leaves_no_task(upstreams: SlowUpstreams) -> None:
    upstreams("https://mail.example", delay=0.01)
    async with httpx.AsyncClient(timeout=5.0) as mail_client, asgi_client(
        order_app(mail_client)
    ) as client:
        with Guard() as g:
            leaks = LeakCheck().start()
            assert (await client.post("/order-fixed")).status_code == 200
            assert await leaks.check(grace_s=0.3) == []
    assert g.findings == []


@ASYNCIO
def spawned_by_a_request(coro: Any) -> asyncio.Task[Any]:
    """A task created while serving a request (only those can leak: armed by context)."""
    token = context.enter("GET /poll")
    try:
        return asyncio.create_task(coro)
    finally:
        context.leave(token)


@ASYNCIO
async def test_task_the_test_itself_started_is_not_the_apps_leak() -> None:
    leaks = LeakCheck().start()
    task = asyncio.create_task(asyncio.sleep(NOTIFY_DELAY))
    assert await leaks.check(grace_s=0.05) == []
    assert not task.done()  # left alone: it is the test's to manage
    task.cancel()


@ASYNCIO
async def test_task_that_finishes_within_the_grace_is_not_a_leak() -> None:
    leaks = LeakCheck().start()
    task = spawned_by_a_request(asyncio.sleep(0.05))
    assert await leaks.check(grace_s=2.0) == []
    assert task.done() and not task.cancelled()


@ASYNCIO
async def test_check_is_bounded_even_with_a_frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    leaks = LeakCheck().start()
    task = spawned_by_a_request(asyncio.sleep(NOTIFY_DELAY))
    await asyncio.sleep(0)
    monkeypatch.setattr(time, "monotonic", lambda: 0.0)  # the loop clock stops
    started = context.perf_counter()
    [finding] = await leaks.check(grace_s=0.2)
    monkeypatch.undo()
    assert context.perf_counter() - started < NOTIFY_DELAY / 5
    assert finding.kind == "task-leak"
    assert finding.request == "GET /poll"
    assert task.cancelled()


@ASYNCIO
@pytest.mark.parametrize("hook", ["c", "python"])
@pytest.mark.parametrize("users", [False, True], ids=["no-factory", "users-factory"])
async def test_create_task_makes_tasks_as_the_loop_would(
    hook: str, users: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leak check's ``loop.create_task`` (in C where built, else Python) makes each task
    as the loop would have, through a task factory the app set, with its name and context;
    the loop's task factory stays the app's; only a task made for a request is noted, at
    the line that asked for it."""
    if hook == "python":
        monkeypatch.setattr(steps, "_cstep", None)
    elif steps._cstep is None:
        pytest.skip("the C module is not built here")
    loop = asyncio.get_running_loop()
    made: list[dict[str, Any]] = []

    def users_factory(loop: Any, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        made.append(kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    factory = users_factory if users else None
    loop.set_task_factory(factory)
    method = type(loop).create_task
    other = asyncio.new_event_loop()  # of the same class
    try:
        leaks = LeakCheck().start()
        assert loop.get_task_factory() is factory
        hooked = type(loop).create_task
        assert type(hooked).__name__ == ("CreateTask" if hook == "c" else "function")
        assert hooked.__wrapped__ is method
        assert inspect.signature(hooked) == inspect.signature(method)
        assert inspect.signature(loop.create_task) == inspect.signature(
            method.__get__(loop))  # bound as the method is
        token = context.enter("GET /other")
        try:  # a task of another loop of that class, made for a request: not ours to note
            elsewhere = other.create_task(asyncio.sleep(0))
        finally:
            context.leave(token)
        assert elsewhere not in leaks._created_at
        elsewhere._log_destroy_pending = False  # never run: its loop is closed below
        elsewhere.get_coro().close()
        ctx = contextvars.copy_context()
        named = asyncio.create_task(asyncio.sleep(0), name="named")
        in_ctx = asyncio.create_task(asyncio.sleep(0), context=ctx)
        leaked = spawned_by_a_request(asyncio.sleep(NOTIFY_DELAY))
        assert named.get_name() == "named"
        await asyncio.gather(named, in_ctx)
        [finding] = await leaks.check(grace_s=0.05)
        assert type(loop).create_task is method  # taken off by the check
    finally:
        loop.set_task_factory(None)
        other.close()
    assert leaked.cancelled()
    assert (finding.kind, finding.request) == ("task-leak", "GET /poll")
    assert finding.line == line_of(spawned_by_a_request, "return asyncio.create_task(coro)")
    if users:
        assert made == [{}, {"context": ctx}, {}]


@ASYNCIO
async def test_create_task_is_restored() -> None:
    loop = asyncio.get_running_loop()
    method = type(loop).create_task
    leaks = LeakCheck().start()
    assert type(loop).create_task is not method
    await leaks.check(grace_s=0.0)
    assert type(loop).create_task is method
    assert "create_task" not in vars(type(loop))  # inherited again, as before


@ASYNCIO
async def test_thread_hook_and_create_task_are_live_patches_restore_all_removes() -> None:
    loop = asyncio.get_running_loop()
    start, method = threading.Thread.start, type(loop).create_task
    leaks = LeakCheck().start()
    live = {(p.owner, p.name) for p in patching.live()}
    assert {("leak check", "start"), ("leak check", "create_task")} <= live
    assert (threading.Thread.start, type(loop).create_task) != (start, method)
    patching.restore_all()  # what the plugin does when a run is interrupted
    assert (threading.Thread.start, type(loop).create_task) == (start, method)
    assert patching.live() == []
    leaks.close()  # idempotent after restore_all
    assert (threading.Thread.start, type(loop).create_task) == (start, method)


# -- worker threads -----------------------------------------------------------------------


def export_app(release: threading.Event) -> FastAPI:
    app = FastAPI()

    def render() -> None:
        release.wait(10)  # a slow sync call nobody can interrupt

    @app.get("/export")
    async def export() -> dict[str, bool]:
        await anyio.to_thread.run_sync(render, abandon_on_cancel=True)
        return {"ok": True}

    return app


@BOTH
async def test_abandoned_worker_thread_is_reported() -> None:
    release = threading.Event()
    app = export_app(release)
    try:
        async with asgi_client(app) as client:
            with Guard(threshold_ms=50) as g, PoolWatch() as watch:
                leaks = LeakCheck(watch).start()
                started = context.perf_counter()
                with anyio.move_on_after(0.1):
                    await client.get("/export")
                request_ended = context.perf_counter() - started
                [finding] = await leaks.check(grace_s=0.2)
                checked = context.perf_counter() - started
                [call] = watch.thread_calls
                assert call.cancelled is not None and call.ended is None  # both moments
    finally:
        release.set()
    assert request_ended < checked  # the request gave up before the thread was free
    assert g.findings == [finding]
    assert finding.kind == "connection-leak"
    assert finding.request == "GET /export"
    assert (finding.file, finding.function) == ("tests/test_leaks.py", "render")
    assert finding.line == line_of(export_app, "def render")
    assert "cancelled" in finding.message
    for _ in range(200):  # the thread ends once released (bounded)
        if call.ended is not None:
            break
        await anyio.to_thread.run_sync(context.real_sleep, 0.01)
    assert call.ended is not None and call.ended > call.cancelled


@BOTH
async def test_finished_worker_thread_is_clean() -> None:
    release = threading.Event()
    release.set()
    async with asgi_client(export_app(release)) as client:
        with Guard() as g, PoolWatch() as watch:
            leaks = LeakCheck(watch).start()
            assert (await client.get("/export")).status_code == 200
            assert await leaks.check(grace_s=0.2) == []
    assert g.findings == []


@BOTH
async def test_thread_a_request_started_running_user_code() -> None:
    stop = threading.Event()

    def poll_forever() -> None:
        while not stop.wait(0.01):
            pass

    leaks = LeakCheck().start()
    mine = threading.Thread(target=poll_forever, name="the-tests-own")
    mine.start()  # the test's own thread: not the app's leak
    token = context.enter("GET /poll")
    try:
        thread = threading.Thread(target=poll_forever, name="poller")
        thread.start()
    finally:
        context.leave(token)
    try:
        [finding] = await leaks.check(grace_s=0.1)
    finally:
        stop.set()
        thread.join(5)
        mine.join(5)
    assert threading.Thread.start.__module__ == "threading"  # the start hook is gone
    assert finding.kind == "connection-leak"
    assert finding.function == "poll_forever"
    assert finding.line == line_of(poll_forever, "stop.wait")
    assert "'poller'" in finding.message and finding.request == "GET /poll"


# -- database connections -----------------------------------------------------------------


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    # A queue pool, as SQLAlchemy >= 2.0.38 gives SQLite files by default (NullPool before).
    eng = create_async_engine(
        f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}", poolclass=AsyncAdaptedQueuePool
    )
    try:
        yield eng
    finally:
        await eng.dispose()


def reports_app(engine: AsyncEngine, kept: list[AsyncConnection]) -> FastAPI:
    app = FastAPI()

    @app.get("/reports")
    async def reports() -> dict[str, int]:
        conn = await engine.connect()  # never closed
        kept.append(conn)
        value = (await conn.execute(text("select 1"))).scalar_one()
        return {"value": value}

    @app.get("/reports-fixed")
    async def reports_fixed() -> dict[str, int]:
        async with engine.connect() as conn:
            value = (await conn.execute(text("select 1"))).scalar_one()
        return {"value": value}

    return app


@ASYNCIO
async def test_connection_never_returned_is_located_at_checkout(engine: AsyncEngine) -> None:
    kept: list[AsyncConnection] = []
    async with asgi_client(reports_app(engine, kept)) as client:
        with Guard() as g, PoolWatch() as watch:
            leaks = LeakCheck(watch).start()
            assert (await client.get("/reports")).status_code == 200
            found = await leaks.check(grace_s=0.1)
    for conn in kept:
        await conn.close()
    [finding] = found
    assert finding.kind == "connection-leak"
    assert finding.request == "GET /reports"
    assert (finding.file, finding.function) == ("tests/test_leaks.py", "reports")
    assert finding.line == line_of(reports_app, "await engine.connect()  #")
    assert "still checked out" in finding.message
    assert g.findings == found


@ASYNCIO
async def test_connection_returned_is_clean(engine: AsyncEngine) -> None:
    async with asgi_client(reports_app(engine, [])) as client:
        with Guard() as g, PoolWatch() as watch:
            leaks = LeakCheck(watch).start()
            for _ in range(3):
                assert (await client.get("/reports-fixed")).status_code == 200
            assert await leaks.check(grace_s=0.1) == []
    assert g.findings == []
    assert watch.checked_out() == []


# -- the warm-pool wedge (FINDINGS: httpcore pool, real sockets) --------------------------
# httpcore sometimes leaves a warm pool with a connection it created for a request that
# then left without using it (a PoolTimeout racing the assignment). Whether that race
# happens is httpcore's business and the machine's timing (bench/wedge.py reproduces it);
# here the detector is tested on real pools put into that state on purpose.


def silent_server() -> Any:
    """A loopback listening socket that is never accepted from: the kernel completes the
    TCP handshake (backlog) and nothing ever answers, so a request sent to it stays ACTIVE
    until cancelled. Use it as a context manager; ``address_of(listener)`` gives its URL."""
    import socket  # (imports local to this section: the rest of the file is another owner's)

    return socket.create_server(("127.0.0.1", 0))


def address_of(listener: Any) -> str:
    host, port = listener.getsockname()[:2]
    return f"http://{host}:{port}/"


def orphan_connection(client: httpx.AsyncClient, url: str) -> tuple[Any, Any]:
    """Have the client's real httpcore pool hand a new connection to a queued request
    whose owner then leaves without using it: the end state of the warm-pool wedge,
    reached through the pool's own assignment code (httpcore 1.0 internals). Returns the
    connection and the request it was given for."""
    import httpcore
    from httpcore._async.connection_pool import AsyncPoolRequest  # httpcore >= 1.0.3
    pool = client._transport._pool  # type: ignore[attr-defined]
    host = httpx.URL(url).netloc
    timeouts = {"connect": 10.0, "read": 60.0, "write": 10.0}
    orphan = AsyncPoolRequest(
        httpcore.Request("GET", url, headers=[(b"Host", host)], extensions={"timeout": timeouts})
    )
    pool._requests.append(orphan)
    pool._assign_requests_to_connections()  # a new connection, CONNECTING, for `orphan`
    pool._requests.remove(orphan)  # ... whose owner is gone
    assert orphan.connection is not None and orphan.connection in pool.connections
    return orphan.connection, orphan.request


async def poll_until(done: Any, what: str) -> None:
    """Poll ``done()`` (bounded): a condition to wait for, not a duration."""
    for _ in range(500):
        if done():
            return
        await anyio.sleep(0.01)
    raise AssertionError(f"never became true: {what}")


ONE_CONNECTION = httpx.Limits(max_connections=1, max_keepalive_connections=1)
SHORT_POOL_WAIT = httpx.Timeout(10.0, pool=0.05)  # the pool is either free or wedged for good


def _has_pool_request() -> bool:
    from httpcore._async import connection_pool

    return hasattr(connection_pool, "AsyncPoolRequest")


@BOTH
@pytest.mark.skipif(
    not _has_pool_request(),
    reason="orphaning a connection by hand needs httpcore 1.0.3's AsyncPoolRequest",
)
@pytest.mark.parametrize("state", ["CONNECTING", "ACTIVE"])
async def test_wedged_pool_is_reported(state: str) -> None:
    """A pool of one whose only connection no request owns: every later request gets
    PoolTimeout (so the state is a real wedge), and the leak check names it."""
    with serve() as server, silent_server() as listener:
        silent = address_of(listener)
        async with httpx.AsyncClient(limits=ONE_CONNECTION, timeout=SHORT_POOL_WAIT) as client:
            with Guard() as g, PoolWatch() as watch:
                leaks = LeakCheck(watch).start()
                async with anyio.create_task_group() as tg:
                    if state == "CONNECTING":
                        stuck, _ = orphan_connection(client, server.url)
                    else:  # the orphan's connection got as far as sending, to a silent server
                        stuck, request = orphan_connection(client, silent)
                        tg.start_soon(stuck.handle_async_request, request)
                        await poll_until(lambda: ", ACTIVE," in stuck.info(), "ACTIVE")
                    with pytest.raises(httpx.PoolTimeout):
                        await client.get(server.url)  # the request that finds it wedged
                    found = await leaks.check(grace_s=0.1)
                    seen_as = repr(stuck)  # before the cancellation below closes it
                    tg.cancel_scope.cancel()
    [finding] = found
    assert finding.kind == "connection-leak"
    assert "max_connections=1" in finding.message
    assert state in seen_as
    assert f"held 1 connection(s) no request owns at teardown: {seen_as}." in finding.message
    assert finding.file == "tests/test_leaks.py"
    assert finding.function == "test_wedged_pool_is_reported"
    assert finding.line == line_of(test_wedged_pool_is_reported, "# the request that finds")
    assert g.findings == found


@BOTH
async def test_clean_twin_of_the_wedged_pool_is_not_reported() -> None:
    """The same pool, server, requests and check, without the orphaned connection: the
    request is served and nothing is reported, though a connection (idle) is kept."""
    with serve() as server:
        async with httpx.AsyncClient(limits=ONE_CONNECTION, timeout=SHORT_POOL_WAIT) as client:
            with Guard() as g, PoolWatch() as watch:
                leaks = LeakCheck(watch).start()
                for _ in range(2):
                    assert (await client.get(server.url)).status_code == 200
                found = await leaks.check(grace_s=0.1)
                pool = client._transport._pool  # type: ignore[attr-defined]
                [kept] = pool.connections
                assert "IDLE" in repr(kept)
    assert found == []
    assert g.findings == []


@BOTH
async def test_tracked_client_with_a_healthy_pool_is_clean() -> None:
    with serve() as server:
        async with httpx.AsyncClient(timeout=5.0) as client:
            leaks = LeakCheck()
            leaks.track(client)
            leaks.start()
            for _ in range(3):
                await client.get(server.url)
            assert await leaks.check(grace_s=0.1) == []
