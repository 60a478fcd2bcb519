"""The sampling watchdog: a thread that looks at the loop while a long step runs.

It polls about every threshold/4 (between 1 and 50 ms, on the real clock). Once the
running step is past half the threshold it reads the step's Context (the request the loop
thread runs for *right now*, or paused) and samples ``sys._current_frames()`` of the loop
thread, keeping the deepest user frame seen while running for a request (the walk stops
at :func:`context.attributed`'s frame, so the test code that called the app is never
named). A C call holding the GIL cannot be sampled while it runs; it is seen right after
it returns: the watchdog samples first on every wake, before anything that releases the
GIL (reading ``/proc``), so it gets in before the loop thread can finish the step.

Why sample the Context: a whole in-process request can run in ONE step that starts and
ends in the test's code (httpx's ASGITransport calls the app inside the test's task), so
the context at the end of the step does not know the request.

GIL starvation ("CPU work moved to a thread"): when neither the loop nor the watchdog ran
for more than twice the threshold (pure Python in a thread gives the GIL up every 5 ms; a
long C call holding it does not) and the process burned CPU the whole time (so it was not
descheduled by other processes), the other threads' stacks are sampled; a thread running
user code is recorded as a loop-stall with ``call="gil"``.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

from .. import context, guard, patching
from ..clock import real
from ..location import Location, is_user_file, relative, user_location
from ..model import DOCS
from . import discount, steps

if TYPE_CHECKING:
    from .steps import LoopState
    from .watch import LoopWatch

GIL_ADVICE = (
    "CPU-bound Python in a thread still holds the GIL and starves the loop: use a process "
    "pool, or release the GIL (C extensions that do), or split the work"
)

_CONTEXT_FILE = context.__file__
_ATTRIBUTED_NAME = "stallguard_attributed"


class _Cpu:
    """CPU time, captured at import (kept off module attributes, like clock.real)."""

    __slots__ = ("process_time",)

    def __init__(self) -> None:
        self.process_time = time.process_time


_cpu = _Cpu()


class Samples:
    """What the watchdog saw of one long step."""

    __slots__ = (
        "depth",
        "guard",
        "inside",
        "inside_n",
        "outside_after",
        "outside_before",
        "outside_n",
        "request",
    )

    def __init__(self) -> None:
        self.inside: Location | None = None  # deepest user frame inside a request (latest)
        self.depth = -1
        # the request when the deepest location was seen (else the latest seen): the
        # response may be sent (label "background") before the step ends
        self.request: str | None = None
        self.guard: guard.Guard | None = None  # active when sampled
        self.inside_n = 0
        self.outside_n = 0
        # When it was last seen outside a request before it was first seen inside one, and
        # first seen outside after it was last seen inside (0.0: not seen): the request's
        # part of the step lies between them.
        self.outside_before = 0.0
        self.outside_after = 0.0

    def request_span(self, start: float, end: float) -> float:
        """At most how long the step ran for requests (from ``start`` to ``end``)."""
        return (self.outside_after or end) - (self.outside_before or start)


def take_samples(st: LoopState, seq: int) -> Samples | None:
    """Loop thread, at the end of step ``seq``: what was sampled of it (and forget it)."""
    with st.lock:
        samples = st.samples if st.sample_seq == seq else None
        st.samples = None
        st.sample_seq = -1
    return samples


def _log_turn(watch: LoopWatch, states: list[LoopState], start: float, end: float) -> None:
    """The watchdog held the GIL from ``start`` to ``end``: when that was long (it was
    preempted holding it), no loop could run meanwhile; their steps are not blamed for it.
    Until it is logged the turn is open (``watch.turn_since``): a loop thread that gets
    the GIL back before the log (a forced switch) sees it as running up to its own end."""
    if end - start > discount.HELD_MIN_S:
        for st in states:
            st.held.append((start, end))
    watch.turn_since = 0.0


class Watchdog:
    """The sampling thread of one :class:`~.watch.LoopWatch`."""

    def __init__(self, watch: LoopWatch) -> None:
        self.watch = watch
        self.thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        if self.thread is not None:
            return
        self._stopping = False
        self.thread = threading.Thread(
            target=self._run, name="stallguard-loopwatch", daemon=True
        )
        self.thread.start()

    def stop(self, timeout: float) -> None:
        """Stop the thread and join it, waiting at most ``timeout`` seconds."""
        thread, self.thread = self.thread, None
        if thread is None:
            return
        self._stopping = True
        if thread is not threading.current_thread():
            thread.join(timeout=timeout)

    def _run(self) -> None:
        try:
            self._watch(self.watch.interval_s)
        except Exception as exc:
            # A bug of ours: the loops run on unwatched by this thread, never broken.
            kinds = sorted({st.kind for st in list(self.watch._mine.values())})
            patching.hook_failed(
                steps.OWNER, kinds[0] if kinds else "asyncio", "its loop (watchdog)", exc
            )

    def _watch(self, interval: float) -> None:
        watch = self.watch
        sample_after = watch._sample_after_s
        while not self._stopping:
            asked = real.perf_counter()
            cpu0 = _cpu.process_time()
            real.sleep(interval)
            now = watch.turn_since = real.perf_counter()
            states = list(watch._mine.values())
            # Sample first, with the GIL just taken: anything that releases it (reading
            # /proc) lets the loop thread finish the step, and the request, unsampled.
            # Woke late: the GIL was held (a C call on the loop, or a pure-Python step past
            # the switch interval): sample at once, the step may be about to end.
            sampled: set[int] = set()
            late = now - asked - interval > sample_after
            idle_since = self._sample_due(states, now, late, sampled, asked + interval)
            starved = now - idle_since
            if watch.gil and states and starved > 2 * watch._threshold_s:
                # Neither the loop nor this thread ran for that long, and the process
                # burned CPU the whole time (so it was not descheduled by other processes):
                # another thread held the GIL. Checked before reading /proc too: the thread
                # that held the GIL would run on meanwhile.
                cpu = _cpu.process_time() - cpu0
                if cpu >= 0.8 * (now - asked):
                    self._gil_check(starved)
            released = real.perf_counter()
            _log_turn(watch, states, now, released)
            for st in states:
                if st.rq_fd == -2:
                    st.rq_fd = discount.open_schedstat(st.native_id)  # releases the GIL
                    if not st.active and st.rq_fd >= 0:  # detached meanwhile
                        discount.close_schedstat(st)
                elif st.rq_fd >= 0 and st.active and id(st) not in sampled:
                    # Not while sampling a long step: taking the GIL back from a busy loop
                    # thread costs a switch interval (5 ms) before the next sample, and a
                    # reading from inside the step is no baseline for it anyway.
                    discount.read_run_queue(st)  # releases the GIL
                else:
                    continue
                # The GIL was released: a step (a C call) may have run meanwhile and we just
                # got the GIL back at its end: sample again before it can end.
                back = watch.turn_since = real.perf_counter()
                self._sample_due(states, back, back - released > sample_after, sampled)
                released = real.perf_counter()
                _log_turn(watch, states, back, released)

    def _sample_due(
        self,
        states: list[LoopState],
        now: float,
        late: bool,
        sampled: set[int],
        idle_since: float = 0.0,
    ) -> float:
        """Sample every running step past half the threshold (any running step if
        ``late``); return when the loops were last seen running (for the GIL check)."""
        sample_after = self.watch._sample_after_s
        for st in states:
            start = st.start
            if start:
                idle_since = now
                if st.active and (late or now - start > sample_after):
                    sample(st, start, st.seq)
                    sampled.add(id(st))
            elif st.end and now - st.end > discount.COLD_IDLE_S:
                # (a loop that never ran a step is not idle: a TestClient's new loop)
                st.idle_seen = now
            idle_since = max(idle_since, st.end)
        return idle_since

    def _gil_check(self, starved: float) -> None:
        """Nothing ran on the loop for ``starved`` seconds while the process burned CPU:
        name the thread that held the GIL if it is running user code."""
        me = threading.get_ident()
        loops = {st.thread for st in list(self.watch._mine.values())}
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
            self.watch.stalls += 1
            g.record(
                "loop-stall",
                message,
                location=loc,
                request=None,
                duration_ms=starved * 1000.0,
                call="gil",
            )
            return


def sample(st: LoopState, start: float, seq: int) -> None:
    """Watchdog: read the running step's request and stack into its :class:`Samples`."""
    ctx = st.ctx
    frame = sys._current_frames().get(st.thread)
    if frame is None or ctx is None:
        return
    # The live Context of the running step (safe to read under the GIL): which request
    # the loop thread is running for right now, and whether measurement is paused.
    before = real.perf_counter()
    info = context.info_of(ctx)
    # The label now, next to the frames just taken: the walk below can lose the GIL, and
    # the loop thread may finish the request (label "background") before it is done.
    label = info.request if info is not None else None
    after = real.perf_counter()
    loc, depth = walk(frame)
    del frame
    with st.lock:
        if st.start != start or st.seq != seq:
            return  # the step ended before the stack was read
        samples = st.samples
        if samples is None or st.sample_seq != seq:
            samples = st.samples = Samples()
            samples.guard = guard.active()
            st.sample_seq = seq
        if info is not None:
            samples.inside_n += 1
            samples.outside_after = 0.0
            # the deepest line seen, the latest of equally deep ones: a sample taken late
            # (the watchdog woke late) may see the first line of a long loop, the later
            # ones where the time goes
            if loc is not None and depth >= samples.depth:
                samples.inside, samples.depth = loc, depth
                samples.request = label
            elif samples.inside is None:
                samples.request = label  # no location yet: the latest label
        else:
            samples.outside_n += 1
            if not samples.inside_n:
                samples.outside_before = before
            elif not samples.outside_after:
                samples.outside_after = after


# -- frames ----------------------------------------------------------------------------------


def _is_attributed(code: CodeType) -> bool:
    return code.co_name == _ATTRIBUTED_NAME and code.co_filename == _CONTEXT_FILE


def _is_step_boundary(code: CodeType) -> bool:
    """The frame that runs one loop step: nothing outside it belongs to the step."""
    return code in steps.BOUNDARY_CODES or (
        code.co_name == "unrolled_run" and "trio" in code.co_filename
    )


def walk(frame: FrameType | None) -> tuple[Location | None, int]:
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


def suspended(owner: Any) -> tuple[Location | None, bool]:
    """Where the step's task is suspended now (after the step): the innermost user frame
    inside the request (None if the task is not suspended inside one), and whether the
    task is suspended inside an attributed request call (a task that runs requests inline,
    like the test's task with ASGITransport)."""
    coro = None
    if isinstance(owner, asyncio.Handle):  # asyncio steps give the handle: its callback
        owner = owner._callback  # type: ignore[attr-defined]
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


def resume_point(owner: Any) -> object:
    """Where a step left its task: its suspended frames' (code, line), or the task's
    name and "done" (anyio names a task after the function it runs); for a plain
    callback, the code it ran. Two steps with the same request label and resume point
    ran the same code."""
    if isinstance(owner, asyncio.Handle):
        owner = owner._callback  # type: ignore[attr-defined]
    task = getattr(owner, "__self__", owner)
    if isinstance(task, asyncio.Task):
        coro, name = task.get_coro(), task.get_name()
    elif hasattr(task, "coro"):  # trio.lowlevel.Task
        coro, name = task.coro, str(getattr(task, "name", ""))
    else:
        function = getattr(owner, "__func__", owner)
        return getattr(function, "__code__", function)
    frames = _coro_frames(coro)
    if not frames:
        return name, "done"
    # the whole chain: trio suspends every task in the same trap frame
    return tuple((frame.f_code, frame.f_lineno) for frame in frames)


def _has_user_frame(frame: FrameType | None) -> bool:
    while frame is not None:
        if is_user_file(frame.f_code.co_filename):
            return True
        frame = frame.f_back
    return False
