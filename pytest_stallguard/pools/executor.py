"""asyncio's default executor: watch the waits for a worker of ``run_in_executor(None, ...)``.

``asyncio.to_thread`` and ``loop.run_in_executor(None, ...)`` (and libraries built on them,
``loop.getaddrinfo`` among them) run on the loop's default ``ThreadPoolExecutor``, a pool of
``min(32, cpu_count + 4)`` workers apart from anyio's 40 tokens. ``BaseEventLoop`` (every
asyncio loop but uvloop's) is wrapped: per call made for a request, the wait from submission
until a worker started running it and the time it ran. A wait longer than the threshold
(``pool_wait_ms``) is a ``threadpool-saturation`` finding at the app's calling line.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from .. import audit
from ..clock import real
from ..location import user_location
from ..model import DOCS
from .common import Stats, ThreadCall, WatchCore, find_user, request_info
from .threads import _unwrap_user_function

__all__ = ["EXECUTOR_HELP", "ExecutorWatch"]

LIBRARY = "asyncio"
RUN = "asyncio run_in_executor"
NAME = "asyncio default executor"

EXECUTOR_HELP = (
    "asyncio.to_thread and loop.run_in_executor(None, ...) share the loop's default "
    "ThreadPoolExecutor (min(32, cpu_count + 4) workers), apart from anyio's worker "
    "threads. Use anyio.to_thread.run_sync (Starlette's run_in_threadpool) for blocking "
    "calls, or set a default executor sized for the work at startup "
    "(loop.set_default_executor(ThreadPoolExecutor(max_workers=N))); keep CPU work off the "
    "request path."
)


def _target(func: Callable[..., Any]) -> Callable[..., Any]:
    """The function ``asyncio.to_thread`` hands over as ``partial(context.run, func, ...)``."""
    if (isinstance(func, functools.partial) and func.args
            and isinstance(getattr(func.func, "__self__", None), contextvars.Context)):
        return func.args[0]  # type: ignore[no-any-return]
    return func


def _default_size(loop: Any) -> int:
    executor = getattr(loop, "_default_executor", None)
    workers = getattr(executor, "_max_workers", None)
    if isinstance(workers, int):
        return workers
    return min(32, (os.cpu_count() or 1) + 4)  # what asyncio creates on first use


class _Call:
    __slots__ = ("call", "caller", "stats", "what")

    def __init__(self, call: ThreadCall, stats: Stats, caller: FrameType, what: str) -> None:
        self.call = call
        self.stats = stats
        self.caller = caller
        self.what = what


class ExecutorWatch:
    """Times every call a request hands to its loop's default executor (part of
    :class:`PoolWatch`); ``calls`` keeps them (called, started, ended)."""

    def __init__(self, core: WatchCore) -> None:
        self.core = core
        self.calls: list[ThreadCall] = []

    def install(self) -> None:
        core, hooks, watch = self.core, self.core.hooks, self
        link = core.patches.link(asyncio.BaseEventLoop, "run_in_executor")

        @functools.wraps(link.next)
        def run_in_executor(loop: Any, executor: Any, func: Any, *args: Any) -> Any:
            if executor is not None or not core.on or hooks.disabled(RUN):
                return link.next(loop, executor, func, *args)
            watched: _Call | None = hooks.safely(
                LIBRARY, RUN, None, watch._begin, loop, sys._getframe(1), func
            )
            if watched is None:
                return link.next(loop, executor, func, *args)

            def in_worker(*a: Any) -> Any:
                hooks.safely(LIBRARY, RUN, None, watch._started, watched)
                try:
                    return func(*a)
                finally:
                    hooks.safely(LIBRARY, RUN, None, watch._ended, watched)

            future = link.next(loop, executor, in_worker, *args)
            hooks.safely(LIBRARY, RUN, None, watch._submitted, loop, watched, future)
            return future

        core.patches.set(asyncio.BaseEventLoop, "run_in_executor", run_in_executor, link)

    # -- bookkeeping (each step runs under HookGuard.safely) ----------------------------
    def _begin(self, loop: Any, caller: FrameType, func: Callable[..., Any]) -> _Call | None:
        info = request_info()
        if info is None:
            return None
        stats = self.core.stat(loop, NAME, "threadpool")
        target = _target(func)
        location = (
            find_user(caller, stop_at_boundary=True)
            or _unwrap_user_function(target)
            or user_location(caller)
        )
        via_to_thread = caller.f_code.co_name == "to_thread" and caller.f_globals.get(
            "__name__") == "asyncio.threads"
        call = ThreadCall(
            function=getattr(target, "__qualname__", type(target).__name__),
            request=info.request, location=location, called=real.perf_counter(),
        )
        with self.core.lock:
            self.calls.append(call)
        what = "asyncio.to_thread" if via_to_thread else "loop.run_in_executor"
        return _Call(call, stats, caller, what)

    def _submitted(self, loop: Any, watched: _Call, future: asyncio.Future[Any]) -> None:
        watched.stats.size = _default_size(loop)
        future.add_done_callback(lambda _: self.core.hooks.safely(
            LIBRARY, RUN, None, self._returned, watched))

    def _started(self, watched: _Call) -> None:
        call = watched.call
        call.started = real.perf_counter()
        call.thread = threading.get_ident()
        with self.core.lock:
            watched.stats.enter()

    def _ended(self, watched: _Call) -> None:
        watched.call.ended = real.perf_counter()
        with self.core.lock:
            if watched.call.thread is not None:  # _started counted it
                watched.stats.in_use -= 1

    def _returned(self, watched: _Call) -> None:
        call, stats, core = watched.call, watched.stats, self.core
        if call.started is None:  # cancelled before a worker took it
            call.cancelled = real.perf_counter()
        granted = call.started if call.started is not None else call.cancelled
        assert granted is not None
        wait_ms = (granted - call.called) * 1000.0
        audit.span("thread_wait", call.called, granted)  # the request's audit (issue 10)
        if call.started is not None:
            audit.span("thread", call.started, call.ended or real.perf_counter())
        with core.lock:
            stats.waits_ms.append(wait_ms)
        if wait_ms > core.threshold_ms:
            core.record(
                "threadpool-saturation",
                f"{call.request} waited {wait_ms:.0f} ms for a worker of the {NAME} to run "
                f"{call.function} via {watched.what} (threshold {core.threshold_ms:g} ms; "
                f"{stats.size} workers, {stats.max_in_use} busy at most). {EXECUTOR_HELP} "
                f"See {DOCS}threadpool-saturation",
                location=call.location, request=call.request, duration_ms=wait_ms,
                call=watched.what, frame=watched.caller,
            )
