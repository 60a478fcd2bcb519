"""Teardown checks: what a test left running or checked out.

A request that timed out is not the same moment as the resources it used being released:
a cancelled ``to_thread`` call returns at once while its worker thread runs on; a
fire-and-forget task keeps calling a slow upstream after the response; an httpcore pool
can keep a connection stuck ``CONNECTING`` after mixed timeouts, and every later request
then gets ``PoolTimeout``. :class:`LeakCheck` snapshots what exists when the test starts and,
at teardown, gives everything a short grace period (bounded by the real clock), then
records what is still there:

- ``task-leak``: asyncio tasks created during the test and still pending. They are then
  cancelled (bounded wait) so the suite goes on. On trio, tasks cannot outlive the nursery
  that started them (structured concurrency), so there is nothing to check;
- ``connection-leak``: worker threads still busy with a request's work, threads started
  during the test still running user code, SQLAlchemy / asyncpg connections still checked
  out (located at the line that checked them out, via :class:`~.pools.PoolWatch`), and httpx
  pools holding connections stuck connecting or busy with no request (each library's
  module under ``pools/`` knows how to find its own).

Like tasks and threads, connections are armed by context: only those a request (or a task
it started) checked out count, never those of the test's own fixtures. They are read
before leaked tasks are cancelled, since cancelling a task gives its connection back.

The ``Thread.start`` hook and the loop's ``create_task`` go through :mod:`.patching`, and
their bookkeeping never reaches the app (a failure is noted and that hook turns off).
"""

from __future__ import annotations

import asyncio
import functools
import sys
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import CoroutineType, FrameType, GeneratorType
from typing import Any

import anyio
import anyio.to_thread

from . import context, guard, patching
from .clock import real
from .location import _PLUGIN_DIR, Location, is_user_file, relative, user_location
from .loopwatch import steps
from .model import DOCS, Finding
from .pools import PoolWatch
from .pools.common import CheckedOut, HookGuard
from .pools.httpx import StuckPool, stuck_connections, stuck_pools

__all__ = ["LeakCheck", "stuck_connections"]

THREAD_START = "threading.Thread.start"
CREATE_TASK = "loop.create_task"

TASK_HELP = (
    "A task nobody awaits outlives its request: it keeps connections and memory, its "
    "errors are lost, and under load they pile up. Run it in a TaskGroup the request (or "
    "the lifespan) owns, or use a queue and a worker started in the lifespan; if it calls "
    "out, give it a timeout."
)
THREAD_HELP = (
    "Cancelling a request does not stop the worker thread running its sync code: the "
    "thread (and its token, connection, memory) stays busy until the call returns. Give "
    "the blocking call its own timeout, or make it async."
)
CONNECTION_HELP = (
    "A connection that is never returned shrinks the pool for every later request until "
    "it is exhausted. Use `async with engine.connect()` / `async with pool.acquire()` so "
    "the connection goes back on errors and cancellation too."
)
HTTPX_HELP = (
    "httpcore's pool kept connections that no request owns (timeouts or cancellation "
    "while connecting/reading); they count against max_connections for good, so later "
    "requests get PoolTimeout. Close and recreate the client when this happens, keep "
    "pool timeouts shorter than read timeouts, and avoid cancelling requests mid-connect."
)


@dataclass(frozen=True)
class _Seen:
    kind: str
    message: str
    location: Location
    request: str | None
    duration_ms: float | None
    call: str | None


def _coro_location(coro: Any) -> Location | None:
    """The innermost user frame in a suspended coroutine's await chain."""
    found: Location | None = None
    depth = 0
    while coro is not None and depth < 50:
        frame: FrameType | None = getattr(coro, "cr_frame", None) or getattr(
            coro, "gi_frame", None
        ) or getattr(coro, "ag_frame", None)
        if frame is not None and is_user_file(frame.f_code.co_filename):
            found = relative(frame.f_code.co_filename), frame.f_lineno, frame.f_code.co_name
        nxt = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
        if nxt is None or not isinstance(nxt, (CoroutineType, GeneratorType)):
            break
        coro = nxt
        depth += 1
    return found


def _innermost_user(frame: FrameType | None) -> Location | None:
    while frame is not None:
        if is_user_file(frame.f_code.co_filename):
            code = frame.f_code
            return relative(code.co_filename), frame.f_lineno, code.co_name
        frame = frame.f_back
    return None


def _where(location: Location | None) -> str:
    if location is None or location[0] is None:
        return "<unknown>"
    return f"{location[0]}:{location[1]} ({location[2]})"


class LeakCheck:
    """Snapshot at test start, check at teardown.

    ``start()`` is sync; call it inside the running loop (an async fixture) so the tasks
    that already exist are known; called outside a loop, tasks are not checked. ``check``
    is async, runs in the same loop, and never waits longer than about
    ``grace_s + cancel_timeout_s`` of real time.
    """

    def __init__(
        self,
        watch: PoolWatch | None = None,
        guard_: guard.Guard | None = None,
        *,
        record_creation: bool = True,
    ) -> None:
        self.watch = watch
        self._guard = guard_
        self._record_creation = record_creation
        self._tasks_before: weakref.WeakSet[asyncio.Task[Any]] | None = None
        self._patches = patching.Patches("leak check")
        self._hooks = HookGuard("leak check")
        self._watching_threads = False
        self._started_by: weakref.WeakKeyDictionary[threading.Thread, str] = (
            weakref.WeakKeyDictionary()
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._created_at: weakref.WeakKeyDictionary[asyncio.Task[Any], tuple[Location, str]] = (
            weakref.WeakKeyDictionary()
        )
        self._httpx: weakref.WeakSet[Any] = weakref.WeakSet()
        self._started = real.perf_counter()
        self.cancelled_tasks = 0
        self.findings: list[Finding] = []

    # -- start -------------------------------------------------------------------------
    def start(self) -> LeakCheck:
        self._started = real.perf_counter()
        self._watch_thread_starts()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            self._loop = loop
            self._tasks_before = weakref.WeakSet(asyncio.all_tasks(loop))
            if self._record_creation:
                self._install_factory(loop)
        return self

    def track(self, client: Any) -> None:
        """Also check this httpx client's pools at teardown (used or not)."""
        self._httpx.add(client)

    def _install_factory(self, loop: asyncio.AbstractEventLoop) -> None:
        """Note where each task made for a request is made, in ``loop.create_task``
        (asyncio.create_task, TaskGroups and anyio all call it): a layer on the loop
        class's method (tasks of its other loops pass through), or for a loop whose class
        takes no attributes (uvloop) an instance attribute. Not a task factory: with one
        set, asyncio (before 3.12) names each task twice, a formatted default and then the
        name asked for. Not an instance attribute where a class one can go: the loop's
        own attribute lookups (``self._ready`` ...) lose their fast path."""
        hooks, check = self._hooks, self
        library = "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"
        in_request = context.current_var

        def note(task: Any, frame: FrameType | None) -> None:
            # Only a task created for a request can be its leak: the test's own tasks and
            # a burst's (made outside any request) cost one context variable read.
            if frame is not None and not hooks.disabled(CREATE_TASK, loop):
                hooks.safely(library, CREATE_TASK, loop, check._note_task, task, frame)

        cstep = steps._cstep
        on_class = isinstance(loop, asyncio.BaseEventLoop)

        def make(link: patching.Link) -> Any:
            if cstep is not None:  # the same in C (loopwatch/_cstep.c): no frame a task
                return functools.update_wrapper(
                    cstep.CreateTask(link, in_request, note, loop if on_class else None),
                    link.next)

            @functools.wraps(link.next)
            def create_task(*args: Any, **kwargs: Any) -> Any:
                task = link.next(*args, **kwargs)
                # (on the class, args[0] is the loop it was called on)
                if (not on_class or args[0] is loop) and in_request.get() is not None:
                    note(task, sys._getframe(1))
                return task

            return create_task

        self._patches.wrap(type(loop) if on_class else loop, "create_task", make)

    def _note_task(self, task: asyncio.Task[Any], frame: FrameType) -> None:
        info = context.current()
        if info is not None and info.label != "lifespan":
            self._created_at[task] = (user_location(frame), info.request)

    def _watch_thread_starts(self) -> None:
        """Note which request (if any) starts each thread from now on: only threads a
        request started can be its leak; the test's and its fixtures' own are theirs."""
        if self._watching_threads:
            return
        self._watching_threads = True
        hooks, check = self._hooks, self

        def make(link: patching.Link) -> Any:
            @functools.wraps(link.next)
            def start(*args: Any, **kwargs: Any) -> Any:
                if args and not hooks.disabled(THREAD_START):
                    hooks.safely("python", THREAD_START, None, check._note_thread, args[0])
                return link.next(*args, **kwargs)

            return start

        self._patches.wrap(threading.Thread, "start", make)

    def _note_thread(self, thread: threading.Thread) -> None:
        info = context.current()
        if info is not None and info.label != "lifespan":
            self._started_by[thread] = info.request

    def _unpatch(self) -> None:
        self._watching_threads = False
        self._patches.restore()

    # -- check -------------------------------------------------------------------------
    async def check(self, grace_s: float = 0.5, cancel_timeout_s: float = 2.0) -> list[Finding]:
        """Wait up to ``grace_s`` for leftovers to finish, record what is left, cancel
        leaked tasks (waiting up to ``cancel_timeout_s``); returns the findings."""
        try:
            seen: list[_Seen] = []
            await self._until(lambda: not self._pending_anything(), grace_s)
            tasks = self._pending_tasks()
            for task in tasks:
                seen.append(self._task_finding(task))
            # Before the cancellation: a leaked task that holds a connection gives it back
            # when cancelled, and the connection would never be reported.
            seen.extend(self._connection_findings(held_by_tasks=bool(tasks)))
            if tasks:
                for task in tasks:
                    task.cancel()
                self.cancelled_tasks += len(tasks)
                await self._until(lambda: all(t.done() for t in tasks), cancel_timeout_s)
                # Let resources freed by the cancellation go back (bounded).
                await self._until(lambda: not self._pending_resources(), grace_s)
            seen.extend(self._thread_findings())
            seen.extend(self._httpx_findings())
            return self._report(seen)
        finally:
            self._unpatch()

    def close(self) -> None:
        """Undo what ``start`` installed (create_task, thread-start hook); check() does too."""
        self._unpatch()

    async def _until(self, done: Callable[[], bool], timeout_s: float) -> None:
        """Poll ``done`` until true or ``timeout_s`` of real time passed. Sleeps in a
        thread of our own limiter, so neither a patched loop clock nor a saturated
        default limiter can stretch it."""
        deadline = real.perf_counter() + timeout_s
        limiter = anyio.CapacityLimiter(1)
        while not done():
            left = deadline - real.perf_counter()
            if left <= 0:
                return
            await anyio.to_thread.run_sync(
                real.sleep, min(0.02, left), limiter=limiter, abandon_on_cancel=True
            )

    def _pending_anything(self) -> bool:
        return bool(self._pending_tasks()) or self._pending_resources()

    def _pending_resources(self) -> bool:
        if self.watch is not None and (self.watch.busy_threads() or self._checked_out()):
            return True
        if self._busy_new_threads():
            return True
        return bool(self._stuck_http())

    # -- tasks -------------------------------------------------------------------------
    def _pending_tasks(self) -> list[asyncio.Task[Any]]:
        if self._loop is None or self._tasks_before is None:
            return []
        try:
            current = asyncio.current_task()
        except RuntimeError:
            return []
        pending = []
        for task in asyncio.all_tasks(self._loop):
            if task is current or task.done() or task in self._tasks_before:
                continue
            coro = task.get_coro()
            code = getattr(coro, "cr_code", None)
            if code is not None and code.co_filename.startswith(_PLUGIN_DIR):
                continue  # our own machinery (canary, burst driver)
            # Armed by context: only tasks a request started (they inherit its context).
            # Tasks the test or its fixtures started are theirs to manage, and lifespan
            # tasks live as long as the app.
            # (create_task saw the context at creation; Task.get_context is 3.12+.)
            if task not in self._created_at:
                ctx = getattr(task, "get_context", None)
                info = context.info_of(ctx() if callable(ctx) else None)
                if info is None or info.label == "lifespan":
                    continue
            pending.append(task)
        return pending

    def _task_finding(self, task: asyncio.Task[Any]) -> _Seen:
        coro = task.get_coro()
        name = getattr(coro, "__qualname__", None) or task.get_name()
        now_at = _coro_location(coro)
        created = self._created_at.get(task)
        ctx = getattr(task, "get_context", None)
        task_ctx = ctx() if callable(ctx) else getattr(task, "_context", None)
        info = context.info_of(task_ctx)
        request = created[1] if created is not None else (None if info is None else info.label)
        location = created[0] if created is not None else now_at
        if location is None:
            code = getattr(coro, "cr_code", None)
            location = (relative(code.co_filename), code.co_firstlineno, code.co_name) if code \
                else (None, None, None)
        age_ms = (real.perf_counter() - self._started) * 1000.0
        origin = f" created at {_where(created[0])}" if created is not None else ""
        during = f" during {request}" if request else ""
        message = (
            f"Task {name}(){origin}{during} was still running at teardown "
            f"(now at {_where(now_at)}), {age_ms:.0f} ms after the test started; stallguard "
            f"cancelled it. {TASK_HELP} See {DOCS}task-leak"
        )
        return _Seen("task-leak", message, location, request, age_ms, name)

    # -- threads -----------------------------------------------------------------------
    def _busy_new_threads(self) -> list[tuple[threading.Thread, Location]]:
        frames = sys._current_frames()
        tracked = set()
        if self.watch is not None:
            tracked = {c.thread for c in self.watch.busy_threads()}
        busy = []
        for thread in threading.enumerate():
            ident = thread.ident
            # Only threads a request started since start() (not compared by ident: the OS
            # reuses the ident of a thread that has ended for the next one).
            if (ident is None or ident in tracked or thread not in self._started_by
                    or not thread.is_alive() or thread.name.startswith("stallguard-")):
                continue
            location = _innermost_user(frames.get(ident))
            if location is not None:
                busy.append((thread, location))
        return busy

    def _thread_findings(self) -> Iterable[_Seen]:
        now = real.perf_counter()
        if self.watch is not None:
            for call in self.watch.busy_threads():
                started = call.started if call.started is not None else call.called
                busy_ms = (now - started) * 1000.0
                if call.cancelled is not None:
                    when = (f"the request stopped waiting (cancelled) "
                            f"{(call.cancelled - call.called) * 1000:.0f} ms after the call, "
                            f"but the thread was still busy {busy_ms:.0f} ms after it started")
                else:
                    when = f"the thread was still busy {busy_ms:.0f} ms after it started"
                yield _Seen(
                    "connection-leak",
                    f"A worker thread running {call.function} for {call.request} had not "
                    f"finished at teardown: {when}. {THREAD_HELP} See {DOCS}connection-leak",
                    call.location, call.request, busy_ms, f"thread {call.function}",
                )
        for thread, location in self._busy_new_threads():
            yield _Seen(
                "connection-leak",
                f"Thread {thread.name!r}, started by {self._started_by.get(thread)}, was "
                f"still running {_where(location)} at teardown. {THREAD_HELP} "
                f"See {DOCS}connection-leak",
                location, self._started_by.get(thread), None, f"thread {thread.name}",
            )

    # -- connections -------------------------------------------------------------------
    def _checked_out(self) -> list[CheckedOut]:
        """Connections still checked out that a request (or a task it started) checked
        out. Armed by context: a connection the test or its fixtures hold (a transactional
        fixture hands the app one connection for the whole test and returns it at its own
        teardown, after this check) or the lifespan holds is theirs, not a leak."""
        if self.watch is None:
            return []
        return [out for out in self.watch.checked_out() if out.by_request]

    def _connection_findings(self, held_by_tasks: bool = False) -> list[_Seen]:
        now = real.perf_counter()
        tasks = (" (leaked tasks were still running too: one that holds a connection keeps "
                 "it from the pool until it ends)") if held_by_tasks else ""
        seen = []
        for out in self._checked_out():
            held_ms = (now - out.since) * 1000.0
            during = f" during {out.request}" if out.request else ""
            seen.append(_Seen(
                "connection-leak",
                f"A connection of {out.pool} checked out at {_where(out.location)}{during} "
                f"was still checked out at teardown, {held_ms:.0f} ms later{tasks}. "
                f"{CONNECTION_HELP} See {DOCS}connection-leak",
                out.location, out.request, held_ms, out.pool,
            ))
        return seen

    def _stuck_http(self) -> list[StuckPool]:
        if self.watch is not None:
            return self.watch.stuck_http(list(self._httpx))
        return stuck_pools((), list(self._httpx))

    def _httpx_findings(self) -> Iterable[_Seen]:
        for stuck in self._stuck_http():
            location = (self.watch.transport_user(stuck.transport) if self.watch is not None
                        else None) or (None, None, None)
            states = ", ".join(repr(c) for c in stuck.connections)
            yield _Seen(
                "connection-leak",
                f"An httpx connection pool (max_connections={stuck.max_connections}) still "
                f"held {len(stuck.connections)} connection(s) no request owns at teardown: "
                f"{states}. {HTTPX_HELP} See {DOCS}connection-leak",
                location, None, None, "httpx pool",
            )

    # -- reporting ---------------------------------------------------------------------
    def _report(self, seen: list[_Seen]) -> list[Finding]:
        active = self._guard if self._guard is not None else guard.active()
        out = []
        for item in seen:
            finding: Finding | None
            if active is not None:
                finding = active.record(
                    item.kind, item.message, location=item.location, request=item.request,
                    duration_ms=item.duration_ms, call=item.call,
                )
            else:
                finding = Finding(
                    kind=item.kind, message=item.message, file=item.location[0],
                    line=item.location[1], function=item.location[2], request=item.request,
                    duration_ms=item.duration_ms, call=item.call,
                )
            if finding is not None:
                out.append(finding)
        self.findings.extend(out)
        return out
