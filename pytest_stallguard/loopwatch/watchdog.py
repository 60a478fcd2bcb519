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
long C call holding it does not) and the process burned CPU the whole time, the other
threads' stacks are sampled. Being late is no evidence by itself: threads doing C work that
releases the GIL (argon2, bcrypt, hashlib, zlib) keep the CPUs busy and the watchdog waits
for a CPU, not for the GIL. So the watchdog reads its own schedstat run-queue wait before
sleeping and after waking (:func:`gil_evidence`): only the lateness it did *not* spend
waiting for a CPU was spent waiting for the GIL, and only when that exceeds twice the
threshold is a thread running user code recorded as a loop-stall with ``call="gil"``; the
message gives the split. That wait alone is no proof either when several threads are in user
code (the GIL goes round among many threads, and one preempted while it holds the GIL makes
all wait): they are then looked at for a few ms (:func:`_threads_together`), and threads
running, or waiting for a CPU, side by side release the GIL: not reported. Without
``/proc`` schedstat the lateness is blamed as before and the message says that CPU
contention could not be ruled out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
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


class Watchdog:
    """The sampling thread of one :class:`~.watch.LoopWatch`."""

    def __init__(self, watch: LoopWatch) -> None:
        self.watch = watch
        self.thread: threading.Thread | None = None
        self._stopping = False
        self._rq_fd = -1  # the watchdog thread's own schedstat (watchdog thread only)

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
        # Our own run-queue wait (waiting for a CPU), to tell it from waiting for the GIL.
        # -2: to open (in the loop, when no step runs: opening releases the GIL)
        self._rq_fd = -2 if self.watch.gil else -1
        try:
            self._watch_loop(interval)
        finally:
            fd, self._rq_fd = self._rq_fd, -1
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _watch_loop(self, interval: float) -> None:
        watch = self.watch
        sample_after = watch._sample_after_s
        rq0 = -1  # our run-queue wait (ns) before the sleep, -1 unknown
        while not self._stopping:
            # Before taking the time: reading /proc releases the GIL, and taking it back
            # may wait; that wait is not the sleep's lateness. Not while a loop runs a step
            # (as for the loop's own readings): the step could run to its end unsampled.
            # The last reading is kept instead; being older, it can only count more of the
            # lateness as waiting for a CPU, never less.
            if self._rq_fd != -1 and not any(st.start for st in list(watch._mine.values())):
                released = real.perf_counter()
                if self._rq_fd == -2:
                    self._rq_fd = discount.open_schedstat(threading.get_native_id())
                if self._rq_fd >= 0:
                    rq0 = discount.run_queue_ns(self._rq_fd)  # releases the GIL
                back = real.perf_counter()
                if back - released > sample_after:
                    # Got the GIL back late: a step (a C call holding the GIL) may be
                    # about to end: sample it now, as on a late wake.
                    self._sample_due(list(watch._mine.values()), back, True, set())
            asked = real.perf_counter()
            cpu0 = _cpu.process_time()
            real.sleep(interval)
            now = real.perf_counter()
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
                    self._gil_check(starved, now - asked - interval, rq0)
            released = real.perf_counter()
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
                back = real.perf_counter()
                self._sample_due(states, back, back - released > sample_after, sampled)
                released = real.perf_counter()

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
            idle_since = max(idle_since, st.end)
        return idle_since

    def _gil_check(self, starved: float, late: float = 0.0, rq0: int = -1) -> None:
        """Nothing ran on the loop for ``starved`` seconds while the process burned CPU and
        the watchdog woke ``late`` seconds late: name the thread that held the GIL if it is
        running user code and the lateness was not waiting for a CPU (``rq0``: our
        run-queue wait before the sleep, ns, -1 unknown)."""
        me = threading.get_ident()
        loops = {st.thread for st in list(self.watch._mine.values())}
        g = guard.active()
        if g is None:
            return
        found: Location | None = None
        others: list[int] = []  # idents of the threads in user code
        frame: FrameType | None = None
        # The holder's stack first, before reading /proc releases the GIL and it runs on.
        for ident, frame in sys._current_frames().items():
            if ident == me or ident in loops:
                continue
            loc = user_location(frame)
            if loc[0] is None or not _has_user_frame(frame):
                continue
            if found is None:
                found = loc
            others.append(ident)
        del frame
        if found is None:
            return
        cpu_wait: float | None = None
        together: float | None = None
        fd = self._rq_fd
        if rq0 >= 0 and fd >= 0:
            rq1 = discount.run_queue_ns(fd)  # releases the GIL: after the stacks
            if rq1 >= 0:
                cpu_wait = max(rq1 - rq0, 0) / 1e9
            if len(others) > 1 and cpu_wait is not None:
                together = _threads_together(others[:_MAX_LOOKED_AT], self.watch._threshold_s)
        file, line, function = found
        blame, gil_s, evidence = gil_evidence(
            starved, max(late, starved), cpu_wait, self.watch._threshold_s, together
        )
        if not blame:
            return
        message = (
            f"A worker thread held the GIL for {gil_s * 1000.0:.1f} ms at {file}:{line} "
            f"({function}): the event loop could not run meanwhile ({evidence}; "
            f"{GIL_ADVICE}). See {DOCS}loop-stall"
        )
        self.watch.stalls += 1
        g.record(
            "loop-stall",
            message,
            location=found,
            request=None,
            duration_ms=gil_s * 1000.0,
            call="gil",
        )


_MAX_LOOKED_AT = 64
# Threads that need the GIL to run take turns: together they run (or wait for a CPU) about
# one thread at a time. Threads that release it run side by side.
_TOGETHER = 2.0


def _schedstat_pair(fd: int) -> tuple[float, int, int] | None:
    """(when, ns on a CPU, ns waiting for one) of a thread's open schedstat, or None."""
    try:
        when = real.perf_counter()  # the read runs as soon as the GIL is released
        fields = os.pread(fd, 128, 0).split()
        return when, int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):
        return None


def _threads_together(idents: list[int], threshold: float) -> float | None:
    """Watchdog: how many of the threads ``idents`` ran or waited for a CPU at the same
    time, on average over a short look (a few ms); None when it cannot be measured.

    A thread waiting for the GIL sleeps on a lock: threads that hold the GIL to run take
    turns (about 1), threads doing C work that releases it run side by side (up to their
    number, whether or not a CPU is free for each: waiting for one counts). Each thread's
    rate is taken between its own two readings (every read releases the GIL, and taking
    it back from threads that hold it takes a while)."""
    native = {t.ident: t.native_id for t in threading.enumerate()}
    fds: list[int] = []
    try:
        for ident in idents:
            tid = native.get(ident)
            if tid is None:
                continue
            with contextlib.suppress(OSError):
                fds.append(os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY))
        if len(fds) < 2:
            return None
        before = [_schedstat_pair(fd) for fd in fds]
        real.sleep(min(max(threshold / 2.0, 0.005), 0.020))
        after = [_schedstat_pair(fd) for fd in fds]
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    total = 0.0
    seen = 0
    for b, a in zip(before, after, strict=True):
        if a is None or b is None or a[0] <= b[0]:
            continue  # the thread ended meanwhile
        seen += 1
        busy = max(a[1] - b[1], 0) + max(a[2] - b[2], 0)
        total += min(busy / 1e9 / (a[0] - b[0]), 1.0)
    return total if seen >= 2 else None


def gil_evidence(
    starved: float,
    late: float,
    cpu_wait: float | None,
    threshold: float,
    together: float | None = None,
) -> tuple[bool, float, str]:
    """Whether a thread held the GIL, from the watchdog's own readings (seconds):

    * ``starved``: how long neither the loop nor the watchdog ran;
    * ``late``: how late the watchdog woke (at least ``starved``);
    * ``cpu_wait``: the growth of the watchdog's schedstat run-queue wait over its sleep
      (waiting for a CPU: other threads and processes), None when unreadable;
    * ``together``: with several threads in user code, how many of them ran (or waited for
      a CPU) at the same time right after (:func:`_threads_together`), None if not
      measured.

    A thread waiting for the GIL sleeps on a lock, so its run-queue wait does not grow: the
    lateness that was not run-queue wait is the GIL wait. Threads that run side by side do
    not need the GIL for their work: the GIL went round among them and the threads waiting
    for a CPU, none held it. Returns (blame the GIL, the GIL wait to report, the evidence
    in words)."""
    if cpu_wait is None:
        return (
            starved > 2.0 * threshold,
            starved,
            f"the watchdog woke {late * 1000.0:.1f} ms late; CPU contention could not be "
            f"ruled out (no /proc schedstat here)",
        )
    cpu_wait = min(max(cpu_wait, 0.0), late)
    gil = min(starved, late - cpu_wait)
    evidence = (
        f"the watchdog woke {late * 1000.0:.1f} ms late, of which {cpu_wait * 1000.0:.1f} ms "
        f"waiting for a CPU (other threads and processes) and {gil * 1000.0:.1f} ms waiting "
        f"for the GIL held by that thread"
    )
    if together is not None:
        if together >= _TOGETHER:
            return False, gil, (
                f"{evidence}; but the threads in user code ran side by side "
                f"({together:.1f} at a time): they release the GIL"
            )
        evidence += f"; the threads in user code ran one at a time ({together:.1f} at a time)"
    return gil > 2.0 * threshold, gil, evidence


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
                samples.request = info.request
            elif samples.inside is None:
                samples.request = info.request  # no location yet: the latest label
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


def _has_user_frame(frame: FrameType | None) -> bool:
    while frame is not None:
        if is_user_file(frame.f_code.co_filename):
            return True
        frame = frame.f_back
    return False
