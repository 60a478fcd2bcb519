"""anyio's worker-thread limiter: watch the waits for a token, shrink the limiter.

``anyio.to_thread.run_sync`` is wrapped; Starlette and FastAPI look it up at call time, so
``def`` endpoints, sync dependencies and ``run_in_threadpool`` are seen
(``asyncio.to_thread``/``loop.run_in_executor`` are :mod:`.executor`'s). A request that
waited longer than the threshold for the shared limiter's worker thread, from the call until
the function started running in the worker, is a ``threadpool-saturation`` finding. The
leak check asks :meth:`ThreadWatch.busy` for calls still running in a worker.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import anyio
import anyio.to_thread

from .. import audit, patching
from ..clock import real
from ..location import Location, is_user_file, relative, user_location
from ..model import DOCS
from .common import (
    HookGuard,
    Stats,
    ThreadCall,
    WatchCore,
    check_size,
    find_user,
    request_info,
)

__all__ = ["THREADPOOL_HELP", "ThreadShrink", "ThreadWatch"]

LIBRARY = "anyio"
RUN_SYNC = "anyio.to_thread.run_sync"

THREADPOOL_HELP = (
    "Every `def` endpoint, sync dependency and run_in_threadpool call needs one of the "
    "loop's worker-thread tokens (anyio's default limiter, 40 per loop). Make the endpoint "
    "`async def` with async libraries; raise the limiter "
    "(anyio.to_thread.current_default_thread_limiter().total_tokens) only for I/O-bound "
    "work the downstream can take; keep CPU work off the request path."
)


def _endpoint_location(frame: FrameType | None) -> Location | None:
    """The endpoint of the ASGI scope of the request being served (Starlette routing puts
    it in ``scope["endpoint"]``), found in the frames up to the request boundary."""
    while frame is not None:
        if frame.f_code.co_name == "stallguard_attributed":
            return None
        scope = frame.f_locals.get("scope")
        if isinstance(scope, dict) and "endpoint" in scope:
            found = _unwrap_user_function(scope["endpoint"])
            if found is not None:
                return found
        frame = frame.f_back
    return None


def _unwrap_user_function(func: Any, depth: int = 0) -> Location | None:
    """The user function behind a (partial of a) callable handed to the threadpool."""
    if depth > 5 or func is None:
        return None
    if isinstance(func, functools.partial):
        for candidate in (*func.keywords.values(), *func.args, func.func):
            if callable(candidate):
                found = _unwrap_user_function(candidate, depth + 1)
                if found is not None:
                    return found
        return None
    inner = getattr(func, "__func__", func)
    inner = getattr(inner, "__wrapped__", inner)
    code = getattr(inner, "__code__", None)
    if code is not None and is_user_file(code.co_filename):
        return relative(code.co_filename), code.co_firstlineno, code.co_name
    return None


class _Call:
    """One watched run_sync call: its record, its pool stats and whose limiter it used."""

    __slots__ = ("call", "caller", "shared", "stats")

    def __init__(self, call: ThreadCall, stats: Stats, shared: bool, caller: FrameType
                 ) -> None:
        self.call = call
        self.stats = stats
        self.shared = shared
        self.caller = caller


class ThreadWatch:
    """Times every worker-thread call made for a request (part of :class:`PoolWatch`)."""

    def __init__(self, core: WatchCore) -> None:
        self.core = core
        self.calls: list[ThreadCall] = []
        self._running: set[int] = set()  # ids of ThreadCall running in a worker

    def install(self) -> None:
        core, hooks, watch = self.core, self.core.hooks, self
        link = core.patches.link(anyio.to_thread, "run_sync")

        @functools.wraps(link.next)
        async def run_sync(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if not core.on or hooks.disabled(RUN_SYNC):
                return await link.next(func, *args, **kwargs)
            watched: _Call | None = hooks.safely(
                LIBRARY, RUN_SYNC, None, watch._begin, sys._getframe(1), func, kwargs
            )
            if watched is None:
                return await link.next(func, *args, **kwargs)

            def in_worker(*a: Any) -> Any:
                hooks.safely(LIBRARY, RUN_SYNC, None, watch._started, watched)
                try:
                    return func(*a)
                finally:
                    hooks.safely(LIBRARY, RUN_SYNC, None, watch._ended, watched)

            try:
                return await link.next(in_worker, *args, **kwargs)
            except BaseException as exc:
                hooks.safely(LIBRARY, RUN_SYNC, None, watch._cancelled, watched, exc)
                raise
            finally:
                hooks.safely(LIBRARY, RUN_SYNC, None, watch._returned, watched)

        core.patches.set(anyio.to_thread, "run_sync", run_sync, link)

    def busy(self) -> list[ThreadCall]:
        """Worker-thread calls for a request that have not finished."""
        with self.core.lock:
            return [c for c in self.calls if id(c) in self._running]

    # -- bookkeeping (each step runs under HookGuard.safely) ----------------------------
    def _begin(self, caller: FrameType, func: Callable[..., Any], kwargs: dict[str, Any]
               ) -> _Call | None:
        info = request_info()
        if info is None:
            return None
        limiter = kwargs.get("limiter")
        # Only the shared default limiter saturates by accident (every `def` endpoint and
        # sync dependency draws on it). A limiter the app made for itself is deliberate
        # back-pressure (CPU work, one thread at a time): its waits are reported in the
        # pools section, not as a finding.
        shared = limiter is None
        if limiter is None:
            limiter = anyio.to_thread.current_default_thread_limiter()
            name = "anyio worker threads"
        else:
            name = f"anyio limiter {type(limiter).__name__}"
        stats = self.core.stat(limiter, name, "threadpool")
        stats.size = int(limiter.total_tokens)
        target = _unwrap_user_function(func)
        location = (
            target
            or _endpoint_location(caller)
            or find_user(caller, stop_at_boundary=True)
            or user_location(caller)
        )
        call = ThreadCall(
            function=target[2] or "?" if target is not None
            else getattr(func, "__qualname__", type(func).__name__),
            request=info.request, location=location, called=real.perf_counter(),
        )
        with self.core.lock:
            self.calls.append(call)
        return _Call(call, stats, shared, caller)

    def _started(self, watched: _Call) -> None:
        call, stats = watched.call, watched.stats
        call.started = real.perf_counter()
        call.thread = threading.get_ident()
        with self.core.lock:
            self._running.add(id(call))
            stats.enter()

    def _ended(self, watched: _Call) -> None:
        watched.call.ended = real.perf_counter()
        with self.core.lock:
            if id(watched.call) in self._running:
                self._running.discard(id(watched.call))
                watched.stats.in_use -= 1

    def _cancelled(self, watched: _Call, exc: BaseException) -> None:
        if isinstance(exc, anyio.get_cancelled_exc_class()):
            watched.call.cancelled = real.perf_counter()

    def _returned(self, watched: _Call) -> None:
        call, stats, core = watched.call, watched.stats, self.core
        now = real.perf_counter()
        granted = call.started if call.started is not None else now
        wait_ms = (granted - call.called) * 1000.0
        audit.span("thread_wait", call.called, granted)  # the request's audit (issue 10)
        audit.span("thread", granted, call.ended if call.ended is not None else now)
        with core.lock:
            stats.waits_ms.append(wait_ms)
        # The wait is what the request felt: a token, then a worker (started if the pool had
        # none idle), then the worker running it. Whether every token was taken at call time
        # says little (50 calls issued together all see free tokens; measured: 10 of 50
        # requests on 40 tokens waited 100-500 ms, but a token count at call time found
        # that in 1 run of 18), so a wait past the threshold is the finding.
        if watched.shared and wait_ms > core.threshold_ms:
            core.record(
                "threadpool-saturation",
                f"{call.request} waited {wait_ms:.0f} ms for a worker thread to run "
                f"{call.function} (threshold {core.threshold_ms:g} ms; limiter of "
                f"{stats.size} tokens, {stats.max_in_use} busy at most). "
                f"{THREADPOOL_HELP} See {DOCS}threadpool-saturation",
                location=call.location, request=call.request, duration_ms=wait_ms,
                call="to_thread.run_sync", frame=watched.caller,
            )


class ThreadShrink:
    """Sets the worker-thread limiter of the running loop (or of the next ones) to ``n``."""

    def __init__(self, patches: patching.Patches, hooks: HookGuard) -> None:
        self._patches = patches
        self._hooks = hooks
        self._limiters: list[tuple[Any, float]] = []
        self._tokens: int | None = None
        self._patched = False

    def threads(self, n: int) -> None:
        self._tokens = check_size("threads", n)
        try:
            limiter = anyio.to_thread.current_default_thread_limiter()
        except Exception:  # no running loop here: apply at the first worker-thread call
            limiter = None
        if limiter is not None:
            self._apply(limiter)
        self._patch_run_sync()

    def _apply(self, limiter: Any) -> None:
        assert self._tokens is not None
        if not any(existing is limiter for existing, _ in self._limiters):
            self._limiters.append((limiter, limiter.total_tokens))
        limiter.total_tokens = self._tokens

    def _apply_current(self) -> None:
        if self._tokens is None:
            return
        limiter = anyio.to_thread.current_default_thread_limiter()
        if limiter.total_tokens != self._tokens:
            self._apply(limiter)

    def _patch_run_sync(self) -> None:
        if self._patched:
            return
        self._patched = True
        link = self._patches.link(anyio.to_thread, "run_sync")
        shrink, hooks = self, self._hooks

        @functools.wraps(link.next)
        async def run_sync(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            if not hooks.disabled(RUN_SYNC):
                hooks.safely(LIBRARY, RUN_SYNC, None, shrink._apply_current)
            return await link.next(func, *args, **kwargs)

        self._patches.set(anyio.to_thread, "run_sync", run_sync, link)

    def restore(self, errors: list[BaseException]) -> None:
        """Put every limiter back (the run_sync patch is the owner's to take off)."""
        self._tokens = None
        self._patched = False
        while self._limiters:
            limiter, tokens = self._limiters.pop()
            try:
                limiter.total_tokens = tokens
            except BaseException as exc:
                errors.append(exc)

