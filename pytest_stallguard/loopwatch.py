"""Loop-stall capture: time every step of the event loop and name the line that held it.

Heartbeat gaps false-alarm under load (GC pauses, one loop iteration running many
ready callbacks), so each *step* is timed instead:

* asyncio: ``asyncio.events.Handle._run`` is wrapped (a class attribute, global; loops
  that were not attached call straight through);
* uvloop: it has no ``asyncio.Handle``; the running loop's ``call_soon``, ``call_later``,
  ``call_at`` and ``call_soon_threadsafe`` are replaced by instance attributes that wrap
  each callback (task steps and future callbacks go through them; uvloop's own transport
  callbacks do not, and in-process ASGI uses none);
* trio: an instrument with ``before_task_step``/``after_task_step``.

Each step wrapper stores, in plain attributes of a per-loop state, the step's number, its
live ``contextvars.Context`` and its start time; nothing else happens unless the step ran
longer than the threshold. A watchdog thread polls (about every threshold/4, between 1 and
50 ms, on the real clock). Once the running step is past half the threshold it reads the
step's Context (the request the loop thread runs for *right now*, or paused) and samples
``sys._current_frames()`` of the loop thread, keeping the deepest user frame seen while
running for a request (the walk stops at :func:`context.attributed`'s frame, so the test
code that called the app is never named). A C call holding the GIL cannot be sampled while
it runs; it is seen right after it returns: the watchdog samples first on every wake,
before anything that releases the GIL (reading ``/proc``), so it gets in before the loop
thread can finish the step.

Why sample the Context: a whole in-process request can run in ONE step that starts and
ends in the test's code (httpx's ASGITransport calls the app inside the test's task), so
the context at the end of the step does not know the request. A long step that was
sampled is blamed only if a sample saw it running for a request; one that was not sampled
(a C call holding the GIL to the end of the step) is attributed by its context at the end
of the step, located where its task is suspended after it if that is inside the request
(said so in the message); a frame outside the request is never named: the location is then
None and the message says it could not be sampled.

Steps are timed from the first step that starts after :meth:`LoopWatch.attach`: the step
that calls ``attach()`` is already running and is not timed.

What is not blamed on the app:
* GC: ``gc.callbacks`` log every collection; a step's GC time is subtracted, and a step
  that is only over the threshold because of GC is counted in :attr:`LoopWatch.gc_pauses`
  instead of being recorded.
* Preemption: time the loop thread spent runnable but not running (other processes had
  the CPU: CPU burners, a busy CI machine), from ``/proc/self/task/<tid>/schedstat`` on
  Linux, is subtracted; steps only over the threshold because of it are counted in
  :attr:`LoopWatch.preempted`. The watchdog reads it at every wake (after sampling, and
  not while a long step is being sampled) and keeps a few timestamped readings (at most
  one per running step); the end of a long step reads it again and subtracts the wait
  since the last reading taken *before the step started* (a reading from partway through
  the step would leave the wait before it counted as the app's). Wait that may have
  fallen in the gap between that reading and the step start (at most one poll interval,
  threshold/4) is counted half: the estimate of the app's time is off by at most
  threshold/8 either way, and only when the loop was preempted. Nothing reads ``/proc``
  on the per-step path.
* Trapped blocking calls: time inside a call :mod:`traps` recorded is subtracted too (the
  blocking-call finding already names it).
* Steps not running for a request (the test's own code, pytest-asyncio internals) or
  running in a paused window (``Guard.paused()``).

GIL starvation ("CPU work moved to a thread"; ``gil=False`` turns it off): when neither
the loop nor the watchdog ran for more than twice the threshold (pure Python in a thread
gives the GIL up every 5 ms; a long C call holding it does not) and the process burned CPU
the whole time (so it was not descheduled by other processes), the other threads' stacks
are sampled; a thread running user code is recorded as a loop-stall with ``call="gil"``
(request None: the context of another thread cannot be read).
"""

from __future__ import annotations

import asyncio
import asyncio.events
import contextlib
import contextvars
import gc
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from types import CodeType, FrameType
from typing import Any

from . import context, guard, traps
from .context import perf_counter, real_sleep
from .location import Location, is_user_file, relative, user_location
from .model import DOCS

_CONTEXT_FILE = context.__file__
_ATTRIBUTED_NAME = "stallguard_attributed"

ADVICE = (
    "CPU work or a blocking call in the request: move it to a worker thread "
    "(await anyio.to_thread.run_sync(...)) or a process pool"
)
GIL_ADVICE = (
    "CPU-bound Python in a thread still holds the GIL and starves the loop: use a process "
    "pool, or release the GIL (C extensions that do), or split the work"
)


class _Samples:
    """What the watchdog saw of one long step."""

    __slots__ = ("depth", "guard", "inside", "inside_n", "outside_n", "request")

    def __init__(self) -> None:
        self.inside: Location | None = None  # deepest user frame inside a request call
        self.depth = -1
        # the request when the deepest location was seen (else the latest seen): the
        # response may be sent (label "background") before the step ends
        self.request: str | None = None
        self.guard: guard.Guard | None = None  # active when sampled
        self.inside_n = 0
        self.outside_n = 0


class _LoopState:
    """Per attached loop: what the loop thread is running, read by the watchdog."""

    __slots__ = (
        "active",
        "ctx",
        "end",
        "kind",
        "lock",
        "loop",
        "native_id",
        "rq_fd",
        "rq_hist",
        "sample_seq",
        "samples",
        "seq",
        "start",
        "thread",
        "token",
        "watch",
    )

    def __init__(self, watch: LoopWatch, kind: str, loop: Any, token: Any = None) -> None:
        self.watch = watch
        self.kind = kind
        self.loop = loop
        self.token = token  # trio: the run's TrioToken
        self.thread = threading.get_ident()
        self.native_id = threading.get_native_id()
        self.rq_fd = -2  # /proc schedstat of the loop thread: -2 not opened yet, -1 none
        # (perf_counter after the read, run-queue wait in ns, start of the step it was read
        # wholly inside or 0.0), appended by the watchdog at every wake
        self.rq_hist: deque[tuple[float, int, float]] = deque(maxlen=16)
        self.active = True
        self.start = 0.0  # perf_counter at the start of the running step, 0.0 when idle
        self.ctx: contextvars.Context | None = None  # the running step's live Context
        self.end = 0.0  # perf_counter at the end of the last step
        self.seq = 0
        self.lock = threading.Lock()
        self.samples: _Samples | None = None  # of the step numbered sample_seq
        self.sample_seq = -1


# asyncio loops (and uvloop loops) -> state. Strong references: a loop stays alive until
# detach_all(), so an id can never be reused by a new loop while it is registered.
_states: dict[Any, _LoopState] = {}
_original_run: Callable[[asyncio.Handle], None] | None = None


def _timed_run(self: asyncio.Handle) -> None:
    st = _states.get(self._loop)  # type: ignore[attr-defined]
    if st is None or not st.active:
        _original_run(self)  # type: ignore[misc]
        return
    st.seq += 1
    st.ctx = self._context  # type: ignore[attr-defined]
    start = st.start = perf_counter()
    try:
        _original_run(self)  # type: ignore[misc]
    finally:
        end = st.end = perf_counter()
        st.start = 0.0
        if end - start > st.watch._threshold_s:
            st.watch._step_done(st, start, end, self._context, self._callback)  # type: ignore[attr-defined]


def _uvloop_step(
    st: _LoopState, ctx: contextvars.Context, callback: Callable[..., Any], *args: Any
) -> Any:
    """Runs one uvloop callback (scheduled through the wrappers below), timed."""
    if not st.active:
        return callback(*args)
    st.seq += 1
    st.ctx = ctx
    start = st.start = perf_counter()
    try:
        return callback(*args)
    finally:
        end = st.end = perf_counter()
        st.start = 0.0
        if end - start > st.watch._threshold_s:
            st.watch._step_done(st, start, end, ctx, callback)


def _uvloop_wrappers(st: _LoopState, loop: Any) -> dict[str, Callable[..., Any]]:
    call_soon = loop.call_soon
    call_soon_threadsafe = loop.call_soon_threadsafe
    call_later = loop.call_later
    call_at = loop.call_at
    step = _uvloop_step
    copy = contextvars.copy_context
    # The callback's context is made here (as uvloop would) so the step knows the live
    # Context object it runs in: the watchdog reads the request from it while it runs.

    def stallguard_call_soon(callback: Any, *args: Any, context: Any = None) -> Any:
        ctx = context or copy()
        return call_soon(step, st, ctx, callback, *args, context=ctx)

    def stallguard_call_soon_threadsafe(callback: Any, *args: Any, context: Any = None) -> Any:
        ctx = context or copy()
        return call_soon_threadsafe(step, st, ctx, callback, *args, context=ctx)

    def stallguard_call_later(delay: float, callback: Any, *args: Any, context: Any = None) -> Any:
        ctx = context or copy()
        return call_later(delay, step, st, ctx, callback, *args, context=ctx)

    def stallguard_call_at(when: float, callback: Any, *args: Any, context: Any = None) -> Any:
        ctx = context or copy()
        return call_at(when, step, st, ctx, callback, *args, context=ctx)

    return {
        "call_soon": stallguard_call_soon,
        "call_soon_threadsafe": stallguard_call_soon_threadsafe,
        "call_later": stallguard_call_later,
        "call_at": stallguard_call_at,
    }


class _TrioInstrument:
    """trio instrument timing each task step (duck-typed trio.abc.Instrument)."""

    def __init__(self, st: _LoopState) -> None:
        self.st = st

    def before_task_step(self, task: Any) -> None:
        st = self.st
        st.seq += 1
        st.ctx = task.context
        st.start = perf_counter()

    def after_task_step(self, task: Any) -> None:
        st = self.st
        start = st.start
        end = st.end = perf_counter()
        st.start = 0.0
        if st.active and start and end - start > st.watch._threshold_s:
            st.watch._step_done(st, start, end, task.context, task)


def _run_queue_ns(fd: int) -> int:
    """Time the thread spent runnable but not running (preempted by other processes), from
    ``/proc/self/task/<tid>/schedstat`` (Linux); -1 when unreadable."""
    try:
        return int(os.pread(fd, 128, 0).split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def _read_run_queue(st: _LoopState) -> None:
    """Watchdog: append a timestamped run-queue reading of the loop thread to its history.

    A reading taken wholly inside a step that is still running replaces the previous one
    taken inside that same step, so a long step never pushes the reading from before its
    start out of the history."""
    start = st.start
    before = perf_counter()
    rq = _run_queue_ns(st.rq_fd)  # releases the GIL
    after = perf_counter()
    if rq < 0:
        return
    inside = start if start and start == st.start and start < before else 0.0
    with st.lock:
        hist = st.rq_hist
        if inside and hist and hist[-1][2] == inside:
            hist[-1] = (after, rq, inside)
        else:
            hist.append((after, rq, inside))


def _preempted_s(st: _LoopState, start: float, duration: float) -> float:
    """Loop thread, at the end of a long step: the run-queue wait of the step that started
    at ``start``, from the last reading taken before the start; the part of it that could
    have fallen outside the step (between that reading and the start) is counted half. The
    reading taken here is kept as the baseline of the steps after this one.

    Without a reading from before the start (a step that started before the watchdog's
    first reading after attach()), the time from the start to the oldest reading is taken
    as waiting at the rate measured after it, if that was measured over at least as long;
    else only the wait measured after it counts. 0.0 without schedstat."""
    if st.rq_fd < 0:
        return 0.0
    now_rq = _run_queue_ns(st.rq_fd)
    now = perf_counter()
    if now_rq < 0:
        return 0.0
    with st.lock:
        hist = list(st.rq_hist)
        st.rq_hist.append((now, now_rq, 0.0))
    if not hist:
        return 0.0
    for t, rq, _ in reversed(hist):
        if t <= start:
            # The wait since the reading may have fallen before the step (the loop thread
            # woken from select waits for a CPU too under load) or after it: of what could
            # have, half is counted (exact bounds: all of it or none).
            wait = max((now_rq - rq) / 1e9, 0.0)
            outside = max((start - t) + (now - start - duration), 0.0)
            return min(wait - min(wait, outside) / 2.0, duration)
    base_t, base_rq, _ = hist[0]
    known = max((now_rq - base_rq) / 1e9, 0.0)
    unknown = base_t - start
    if now - base_t >= unknown:
        known += unknown * min(known / (now - base_t), 1.0)
    return min(known, duration)


# -- GC log --------------------------------------------------------------------------------
_gc_log: deque[tuple[float, float]] = deque(maxlen=256)
_gc_start = 0.0
_gc_users = 0


def _gc_callback(phase: str, info: dict[str, Any]) -> None:
    global _gc_start
    if phase == "start":
        _gc_start = perf_counter()
    elif _gc_start:
        _gc_log.append((_gc_start, perf_counter()))
        _gc_start = 0.0


def _overlap(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    total = 0.0
    for a, b in intervals:
        lo, hi = max(a, start), min(b, end)
        if hi > lo:
            total += hi - lo
    return total


# -- frames --------------------------------------------------------------------------------


def _is_attributed(code: CodeType) -> bool:
    return code.co_name == _ATTRIBUTED_NAME and code.co_filename == _CONTEXT_FILE


def _is_step_boundary(code: CodeType) -> bool:
    """The frame that runs one loop step: nothing outside it belongs to the step."""
    return code in _BOUNDARY_CODES or (
        code.co_name == "unrolled_run" and "trio" in code.co_filename
    )


_BOUNDARY_CODES: set[CodeType] = set()


def _walk(frame: FrameType | None) -> tuple[Location | None, int]:
    """(innermost user location of a running step, its depth from the step boundary).

    The walk stops at the step boundary and at the request call of
    :func:`context.attributed`: frames outside it (the test calling the app) are not the
    request's code."""
    user: FrameType | None = None
    depth_in = 0
    frames = 0
    while frame is not None:
        code = frame.f_code
        if _is_step_boundary(code) or _is_attributed(code):
            break
        if user is None and is_user_file(code.co_filename):
            user = frame
            depth_in = frames
        frames += 1
        frame = frame.f_back
    if user is None:
        return None, 0
    loc = (relative(user.f_code.co_filename), user.f_lineno, user.f_code.co_name)
    return loc, frames - depth_in


def _coro_frames(coro: Any) -> list[FrameType]:
    """Frames of a suspended coroutine chain, outermost first."""
    frames: list[FrameType] = []
    seen = 0
    while coro is not None and seen < 200:
        seen += 1
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames


def _suspended(owner: Any) -> tuple[Location | None, bool]:
    """Where the step's task is suspended now (after the step): the innermost user frame
    inside the request (None if the task is not suspended inside one), and whether the
    task is suspended inside an attributed request call (a task that runs requests inline,
    like the test's task with ASGITransport)."""
    coro = None
    task = getattr(owner, "__self__", owner)
    if isinstance(task, asyncio.Task):
        coro = task.get_coro()
    elif hasattr(task, "coro"):  # trio.lowlevel.Task
        coro = task.coro
    if coro is None:
        return None, False
    loc: Location | None = None
    for frame in reversed(_coro_frames(coro)):
        code = frame.f_code
        if _is_attributed(code):
            return loc, True
        if loc is None and is_user_file(code.co_filename):
            loc = relative(code.co_filename), frame.f_lineno, code.co_name
    # Not suspended inside a request call (or the chain could not be followed to it): any
    # user frame seen is the caller's (the test's), never the request's.
    return None, False


_trio_context: Any = None


def _trio_runner() -> Any:
    """The trio run of this thread (an identity for attach()), or None: cheap."""
    global _trio_context
    if _trio_context is None:
        if "trio" not in sys.modules:
            return None
        try:
            from trio._core import _run  # the run's thread-local: no public cheap check

            _trio_context = _run.GLOBAL_RUN_CONTEXT
        except (ImportError, AttributeError):  # pragma: no cover - other trio layouts
            _trio_context = False
    if _trio_context is False:  # pragma: no cover
        try:
            return sys.modules["trio"].lowlevel.current_trio_token()
        except RuntimeError:
            return None
    return getattr(_trio_context, "runner", None)


class LoopWatch:
    """Times every loop step and records loop-stall findings into the active guard."""

    def __init__(self, threshold_ms: float, *, gil: bool = True) -> None:
        if threshold_ms <= 0:
            raise ValueError(f"LoopWatch(threshold_ms={threshold_ms!r}): give a positive number")
        self.threshold_ms = float(threshold_ms)
        self._threshold_s = self.threshold_ms / 1000.0
        self._sample_after_s = self._threshold_s / 2.0
        self.interval_s = min(max(self._threshold_s / 4.0, 0.001), 0.05)
        self.gil = gil  # look for threads starving the loop of the GIL
        self.gc_pauses = 0  # steps over the threshold only because of garbage collection
        self.gc_pause_max_ms = 0.0
        self.preempted = 0  # steps over the threshold only because the OS preempted the loop
        self.stalls = 0  # loop-stall findings recorded (before folding)
        self._mine: dict[Any, _LoopState] = {}  # loop or trio token -> state
        self._instruments: dict[Any, _TrioInstrument] = {}  # trio token -> instrument
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the watchdog thread and the GC log (idempotent)."""
        global _gc_users
        if self._thread is not None:
            return
        self._stopping = False
        if _gc_users == 0:
            gc.callbacks.append(_gc_callback)
        _gc_users += 1
        self._thread = threading.Thread(
            target=self._watchdog, name="stallguard-loopwatch", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop and join the watchdog (bounded wait). Patches stay until detach_all()."""
        global _gc_users
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping = True
        thread.join(timeout=max(1.0, 4 * self.interval_s))
        _gc_users -= 1
        if _gc_users == 0 and _gc_callback in gc.callbacks:
            gc.callbacks.remove(_gc_callback)

    def attach(self) -> None:
        """Time the steps of the running loop (call from inside it; idempotent, cheap)."""
        loop = asyncio.events._get_running_loop()
        if loop is not None:
            if loop in self._mine:
                return
            self._attach_asyncio(loop)
            return
        runner = _trio_runner()
        if runner is None or runner in self._mine:
            return
        trio_mod = sys.modules["trio"]
        token = trio_mod.lowlevel.current_trio_token()
        st = _LoopState(self, "trio", None, token)
        instrument = _TrioInstrument(st)
        trio_mod.lowlevel.add_instrument(instrument)
        self._mine[runner] = st
        self._instruments[runner] = instrument

    def _attach_asyncio(self, loop: Any) -> None:
        global _original_run
        old = _states.get(loop)
        if old is not None and old.watch is not self:
            old.watch._detach_one(loop)
        if isinstance(loop, asyncio.BaseEventLoop):
            if _original_run is None:
                _original_run = asyncio.events.Handle._run
                asyncio.events.Handle._run = _timed_run  # type: ignore[method-assign]
            st = _LoopState(self, "asyncio", loop)
        else:  # uvloop and other loops without asyncio.Handle
            st = _LoopState(self, "uvloop", loop)
            for name, wrapper in _uvloop_wrappers(st, loop).items():
                setattr(loop, name, wrapper)
        _states[loop] = st
        self._mine[loop] = st
        for closed in [lp for lp in self._mine if hasattr(lp, "is_closed") and lp.is_closed()]:
            self._detach_one(closed)

    def _detach_one(self, key: Any) -> None:
        global _original_run
        st = self._mine.pop(key, None)
        if st is None:
            return
        st.active = False
        fd, st.rq_fd = st.rq_fd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
        if st.kind == "trio":
            instrument = self._instruments.pop(key, None)
            trio_mod = sys.modules.get("trio")
            try:
                if (
                    instrument is not None
                    and trio_mod is not None
                    and trio_mod.lowlevel.current_trio_token() is st.token
                ):
                    trio_mod.lowlevel.remove_instrument(instrument)
            except (RuntimeError, KeyError, ValueError):
                pass  # not inside that run (it is over): the instrument went with it
            return
        if _states.get(key) is st:
            del _states[key]
        if st.kind == "uvloop":
            for name in ("call_soon", "call_soon_threadsafe", "call_later", "call_at"):
                with contextlib.suppress(AttributeError):
                    delattr(key, name)
        if _original_run is not None and not any(s.kind == "asyncio" for s in _states.values()):
            asyncio.events.Handle._run = _original_run  # type: ignore[method-assign,assignment]
            _original_run = None

    def detach_all(self) -> None:
        """Undo every attach: Handle._run, uvloop instance attributes, trio instruments
        (removed when called inside that trio run, else dropped with the run)."""
        for key in list(self._mine):
            self._detach_one(key)

    # -- the end of a long step (loop thread) -----------------------------------------------
    def _step_done(
        self,
        st: _LoopState,
        start: float,
        end: float,
        ctx: contextvars.Context | None,
        owner: Any,
    ) -> None:
        # A bug of ours must never break the loop.
        with contextlib.suppress(Exception):
            self._judge(st, start, end, ctx, owner)

    def _judge(
        self,
        st: _LoopState,
        start: float,
        end: float,
        ctx: contextvars.Context | None,
        owner: Any,
    ) -> None:
        seq = st.seq
        with st.lock:
            samples = st.samples if st.sample_seq == seq else None
            st.samples = None
            st.sample_seq = -1
        duration = end - start
        gc_s = _overlap(list(_gc_log), start, end)
        blocked_s = _overlap(
            [(a, b) for thread, a, b in list(traps.recent_blocks) if thread == st.thread],
            start,
            end,
        )
        # Preempted by other processes (CPU burners, a busy CI box): not the app's doing.
        # Against the last reading taken before the step started.
        preempted_s = _preempted_s(st, start, duration)
        if duration - gc_s - blocked_s - preempted_s <= self._threshold_s:
            if gc_s > 0 and duration - blocked_s - preempted_s > self._threshold_s:
                self.gc_pauses += 1
                self.gc_pause_max_ms = max(self.gc_pause_max_ms, gc_s * 1000.0)
            elif preempted_s > 0 and duration - blocked_s > self._threshold_s:
                self.preempted += 1
            return
        if ctx is not None and ctx.get(context._paused, False):
            return
        # The guard active now, or when the step was sampled (a step can run past the end
        # of a test window that ended inside it).
        g = guard.active() or (samples.guard if samples is not None else None)
        if g is None:
            return
        loc: Location | None = None
        request: str | None = None
        note = ""
        if samples is not None and samples.inside_n:
            # Seen running for a request: that request, the deepest user line seen.
            loc, request = samples.inside, samples.request
            if loc is None:
                loc, _ = _suspended(owner)
            if loc is None:
                note = " (no line of the project's code was on the stack when it was sampled)"
        elif samples is not None:
            return  # sampled, never running for a request: the test's own code, paused...
        else:
            # Not sampled (a C call holding the GIL to the end of the step): the context
            # at the end of the step, and where its task is suspended now.
            info = context.info_of(ctx)
            if info is None:
                return
            loc, _ = _suspended(owner)
            if loc is not None:
                note = " (where the request was suspended after the step: the stack could "
                note += "not be sampled while it ran)"
            else:
                note = " (the location could not be sampled: a C call held the GIL to the "
                note += "end of the step)"
            request = info.request
        if request is None:
            return
        file, line, function = loc if loc is not None else (None, None, None)
        if file is None:
            where = "" if note else " at <unknown location>"
        else:
            where = f" at {file}:{line}" + (f" ({function})" if function else "")
        message = (
            f"The event loop was blocked for {duration * 1000.0:.1f} ms during "
            f"{request}{where}{note} ({ADVICE}). See {DOCS}loop-stall"
        )
        self.stalls += 1
        g.record(
            "loop-stall",
            message,
            location=(file, line, function),
            request=request,
            duration_ms=duration * 1000.0,
            call="step",
        )

    # -- watchdog thread -------------------------------------------------------------------
    def _watchdog(self) -> None:
        interval = self.interval_s
        self._watch(interval)

    def _watch(self, interval: float) -> None:
        while not self._stopping:
            asked = perf_counter()
            cpu0 = time.process_time()
            real_sleep(interval)
            now = perf_counter()
            states = list(self._mine.values())
            # Sample first, with the GIL just taken: anything that releases it (reading
            # /proc) lets the loop thread finish the step, and the request, unsampled.
            # Woke late: the GIL was held (a C call on the loop, or a pure-Python step past
            # the switch interval): sample at once, the step may be about to end.
            sampled: set[int] = set()
            late = now - asked - interval > self._sample_after_s
            idle_since = self._sample_due(states, now, late, sampled, asked + interval)
            starved = now - idle_since
            if self.gil and states and starved > 2 * self._threshold_s:
                # Neither the loop nor this thread ran for that long, and the process
                # burned CPU the whole time (so it was not descheduled by other processes):
                # another thread held the GIL. Checked before reading /proc too: the thread
                # that held the GIL would run on meanwhile.
                cpu = time.process_time() - cpu0
                if cpu >= 0.8 * (now - asked):
                    self._gil_check(starved)
            released = perf_counter()
            for st in states:
                if st.rq_fd == -2:
                    st.rq_fd = _open_schedstat(st.native_id)  # releases the GIL
                elif st.rq_fd >= 0 and st.active and id(st) not in sampled:
                    # Not while sampling a long step: taking the GIL back from a busy loop
                    # thread costs a switch interval (5 ms) before the next sample, and a
                    # reading from inside the step is no baseline for it anyway.
                    _read_run_queue(st)  # releases the GIL
                else:
                    continue
                # The GIL was released: a step (a C call) may have run meanwhile and we just
                # got the GIL back at its end: sample again before it can end.
                back = perf_counter()
                self._sample_due(states, back, back - released > self._sample_after_s, sampled)
                released = perf_counter()

    def _sample_due(
        self,
        states: list[_LoopState],
        now: float,
        late: bool,
        sampled: set[int],
        idle_since: float = 0.0,
    ) -> float:
        """Sample every running step past half the threshold (any running step if
        ``late``); return when the loops were last seen running (for the GIL check)."""
        for st in states:
            start = st.start
            if start:
                idle_since = now
                if st.active and (late or now - start > self._sample_after_s):
                    self._sample(st, start, st.seq)
                    sampled.add(id(st))
            idle_since = max(idle_since, st.end)
        return idle_since

    def _sample(self, st: _LoopState, start: float, seq: int) -> None:
        ctx = st.ctx
        frame = sys._current_frames().get(st.thread)
        if frame is None or ctx is None:
            return
        # The live Context of the running step (safe to read under the GIL): which request
        # the loop thread is running for right now, and whether measurement is paused.
        info = context.info_of(ctx)
        loc, depth = _walk(frame)
        del frame
        with st.lock:
            if st.start != start or st.seq != seq:
                return  # the step ended before the stack was read
            samples = st.samples
            if samples is None or st.sample_seq != seq:
                samples = st.samples = _Samples()
                samples.guard = guard.active()
                st.sample_seq = seq
            if info is not None:
                samples.inside_n += 1
                if loc is not None and depth > samples.depth:
                    samples.inside, samples.depth = loc, depth
                    samples.request = info.request
                elif samples.inside is None:
                    samples.request = info.request  # no location yet: the latest label
            else:
                samples.outside_n += 1

    def _gil_check(self, starved: float) -> None:
        """Nothing ran on the loop for ``starved`` seconds while the process burned CPU:
        name the thread that held the GIL if it is running user code."""
        me = threading.get_ident()
        loops = {st.thread for st in self._mine.values()}
        g = guard.active()
        if g is None:
            return
        for ident, frame in sys._current_frames().items():
            if ident == me or ident in loops:
                continue
            loc = user_location(frame)
            if loc[0] is None or not _has_user_frame(frame):
                continue
            file, line, function = loc
            message = (
                f"A worker thread held the GIL for {starved * 1000.0:.1f} ms at {file}:{line} "
                f"({function}): the event loop could not run meanwhile ({GIL_ADVICE}). "
                f"See {DOCS}loop-stall"
            )
            self.stalls += 1
            g.record(
                "loop-stall",
                message,
                location=loc,
                request=None,
                duration_ms=starved * 1000.0,
                call="gil",
            )
            return


def _open_schedstat(native_id: int) -> int:
    # Opened by the watchdog thread, never on the loop (the traps would see the open).
    try:
        return os.open(f"/proc/self/task/{native_id}/schedstat", os.O_RDONLY)
    except OSError:
        return -1


def _has_user_frame(frame: FrameType | None) -> bool:
    while frame is not None:
        if is_user_file(frame.f_code.co_filename):
            return True
        frame = frame.f_back
    return False


_BOUNDARY_CODES.update({_timed_run.__code__, _uvloop_step.__code__})
