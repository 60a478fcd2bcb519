"""Discounting: the part of a long step that is not the app's doing.

* GC: a ``gc.callbacks`` entry (one per :class:`~.watch.LoopWatch`, installed through
  :mod:`..patching`) logs every collection; a step's GC time is subtracted.
* Preemption: time the loop thread spent runnable but not running (other processes had
  the CPU: CPU burners, a busy CI machine), from ``/proc/self/task/<tid>/schedstat`` on
  Linux. It is read between steps: by the loop thread itself at the end of a step, at
  most once every half threshold while the loop is busy (one ``pread``, no GIL hand-over
  to the watchdog), and by the watchdog at its wakes while the loop is idle; a few
  timestamped readings are kept. The end of a long step reads it again and subtracts the
  wait since the last reading taken *before the step started* (a reading from partway
  through the step would leave the wait before it counted as the app's). Wait that may
  have fallen in the gap between that reading and the step start is counted half: the
  estimate of the app's time is off by at most half that gap either way, and only when the
  loop was preempted (the gap is at most half the threshold while the loop is busy, at
  most the watchdog's longest nap after an idle). While the
  watchdog sees the loop thread wait for a CPU, each step reads the thread's CPU time at
  its start (a syscall, only then): a long step then knows exactly how long it was off the
  CPU, and the whole wait since the last reading counts, capped by that (a wait that began
  before the step cannot take any of the step's CPU work).
* Trapped blocking calls: time inside a call :mod:`..traps` recorded (the blocking-call
  finding already names it).
* The watchdog's own turns with the GIL: sampling takes microseconds, but a watchdog
  thread preempted by the OS while it holds the GIL keeps the loop thread off it for a
  whole time slice (tens of ms on a loaded machine). The loop thread sleeps on the GIL
  then, so its run-queue wait does not show it; the watchdog logs every turn that lasted
  longer than :data:`HELD_MIN_S` and that time is subtracted.

All times are ``clock.real.perf_counter`` seconds.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections import deque
from typing import TYPE_CHECKING, Any

from .. import patching, traps
from ..clock import real

if TYPE_CHECKING:
    from .steps import LoopState


def _now() -> float:
    return real.perf_counter()


def overlap(intervals: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of ``intervals`` that fall between ``start`` and ``end``."""
    total = 0.0
    for a, b in intervals:
        lo, hi = max(a, start), min(b, end)
        if hi > lo:
            total += hi - lo
    return total


# -- GC --------------------------------------------------------------------------------------


class GcLog:
    """The recent collections, ``(start, end)``, from a ``gc.callbacks`` entry."""

    def __init__(self) -> None:
        self.log: deque[tuple[float, float]] = deque(maxlen=256)
        self._start = 0.0
        self._callback = self._on_gc  # one bound method: the entry to remove

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        try:
            if phase == "start":
                self._start = real.perf_counter()
            elif self._start:
                self.log.append((self._start, real.perf_counter()))
                self._start = 0.0
        except Exception:  # pragma: no cover - never an unraisable error in a collection
            pass

    def install(self, patches: patching.Patches) -> None:
        gc.callbacks.append(self._callback)
        patches.undo("gc.callbacks entry", self._remove, target="gc")

    def _remove(self) -> None:
        while self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def seconds(self, start: float, end: float) -> float:
        """GC time between ``start`` and ``end``."""
        return overlap(list(self.log), start, end)


# -- trapped blocking calls ------------------------------------------------------------------


def blocked_s(st: LoopState, start: float, end: float) -> float:
    """Time the loop thread spent inside trapped blocking calls between start and end."""
    return overlap(
        [(a, b) for thread, a, b in list(traps.recent_blocks) if thread == st.thread],
        start,
        end,
    )


HELD_MIN_S = 0.0005  # a watchdog turn shorter than this is not worth logging


def held_s(st: LoopState, start: float, end: float) -> float:
    """Time between start and end the watchdog held the GIL: its long turns, and the turn
    still open (counted up to ``end``: the waits it bounds are capped by the time off the
    CPU, so a turn that in fact gave the GIL up earlier takes nothing of the app's work)."""
    turns = list(st.held)
    since = st.watch.turn_since
    if since:
        turns.append((since, end))
    return overlap(turns, start, end)


# -- preemption ------------------------------------------------------------------------------


def open_schedstat(native_id: int) -> int:
    """The loop thread's schedstat file, or -1. ``O_NONBLOCK``: the traps leave such opens
    alone, also on the loop thread (:func:`first_reading`)."""
    try:
        return os.open(f"/proc/self/task/{native_id}/schedstat",
                       os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return -1


def first_reading(st: LoopState) -> None:
    """Loop thread, at attach: open its schedstat file and take the first reading, so the
    loop's first steps (a TestClient's first request starts right after the attach, before
    the watchdog's first wake) have a reading from before them. ``O_NONBLOCK``: the traps
    leave such opens alone. Never raises."""
    if st.rq_fd != -2:
        return
    fd = open_schedstat(st.native_id)
    if fd < 0:
        return  # the watchdog tries again (and notes nothing: schedstat is optional)
    st.rq_fd = fd
    read_run_queue(st)


def close_schedstat(st: LoopState) -> None:
    fd, st.rq_fd = st.rq_fd, -1
    if fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


def run_queue_ns(fd: int) -> int:
    """Time the thread spent runnable but not running (preempted by other processes), from
    ``/proc/self/task/<tid>/schedstat`` (Linux); -1 when unreadable."""
    try:
        return int(os.pread(fd, 128, 0).split()[1])
    except (OSError, ValueError, IndexError):
        return -1


def schedstat(fd: int) -> tuple[int, int]:
    """(time on a CPU, time runnable but not running), ns, of the thread, from one read of
    its schedstat file: one release of the GIL for both; -1 each when unreadable."""
    try:
        fields = os.pread(fd, 128, 0).split()
        return int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):
        return -1, -1


def cpu_ns(fd: int) -> int:
    """Time the thread spent running on a CPU, from the same file; -1 when unreadable."""
    try:
        return int(os.pread(fd, 128, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return -1


# Cold memory. On a virtual machine, memory the process has not touched for a while can
# be many times slower to touch again (measured on this project's 2-core VM: after the
# loop idled 1 s, finishing a timed-out request took 15-30 ms of CPU in one step, the
# same step of the next requests 0.1-0.7 ms; the guest sees no page fault). A long step
# that starts within COLD_WINDOW_S after the loop was seen idle for COLD_IDLE_S is held
# back until a later step of the same request and code shows whether it repeats; with
# nothing to compare it with, COLD_ALLOWANCE_S of it is not counted (the costliest cold
# steps measured there: 30 ms; touching 64 MB after 1 s idle: 63 ms against 4.5 ms).
COLD_IDLE_S = 0.25
COLD_WINDOW_S = 0.1
COLD_ALLOWANCE_S = 0.04


def cold(st: LoopState, start: float, nap: float) -> bool:
    """Whether the step that started at ``start`` ran right after a long idle (``nap``:
    the watchdog's longest sleep, by which its last look at the idle loop can precede
    the step)."""
    return 0.0 <= start - st.idle_seen <= COLD_WINDOW_S + nap


# Run-queue wait between two readings that turns on the steps' CPU readings, and for how
# long they stay on after the last such reading.
PRECISE_AFTER_NS = 1_000_000
PRECISE_FOR_S = 2.0


def read_run_queue(st: LoopState) -> None:
    """Append a timestamped run-queue reading of the loop thread to its history (the
    watchdog while the loop is idle, the loop thread itself between steps).

    A reading taken wholly inside a step that is still running replaces the previous one
    taken inside that same step, so a long step never pushes the reading from before its
    start out of the history."""
    start = st.start
    before = _now()
    cpu, rq = schedstat(st.rq_fd)  # releases the GIL (once: one read gives both)
    after = _now()
    if rq < 0:
        return
    inside = start if start and start == st.start and start < before else 0.0
    with st.lock:
        # Waiting for a CPU now: have the steps read their CPU time for a while.
        if st.rq_hist and rq - st.rq_hist[-1][1] > PRECISE_AFTER_NS:
            st.precise_until = after + PRECISE_FOR_S
            st.precise = True
        elif st.precise and after > st.precise_until:
            st.precise = False
        for hist, value in ((st.rq_hist, rq), (st.cpu_hist, cpu)):
            if inside and hist and hist[-1][2] == inside:
                hist[-1] = (after, value, inside)
            else:
                hist.append((after, value, inside))


def read_between_steps(st: LoopState, end: float) -> None:
    """Loop thread, at the end of a step that ended at ``end``, at most once every
    ``sample_after`` (half the threshold): the reading that will be the baseline of the
    next steps, taken where it is exact (between two steps) and without the GIL changing
    hands (the watchdog takes its readings only while the loop is idle). The file is read
    without blocking; never raises."""
    st.rq_due = end + st.watch._sample_after_s
    if st.rq_fd >= 0:
        read_run_queue(st)


def preempted_s(st: LoopState, start: float, duration: float, whole: bool = False) -> float:
    """Loop thread, at the end of a long step: the run-queue wait of the step that started
    at ``start``, from the last reading taken before the start; the part of it that could
    have fallen outside the step (between that reading and the start) is counted half, or
    whole if ``whole`` (the caller caps it by the step's exact time off the CPU). The
    reading taken here is kept as the baseline of the steps after this one.

    Without a reading from before the start (a step that started before the watchdog's
    first reading after attach()), the time from the start to the oldest reading is taken
    as waiting at the rate measured after it, if that was measured over at least as long;
    else only the wait measured after it counts. 0.0 without schedstat."""
    if st.rq_fd < 0:
        return 0.0
    now_rq = run_queue_ns(st.rq_fd)
    now = _now()
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
            if whole:
                return min(wait, duration)
            outside = max((start - t) + (now - start - duration), 0.0)
            return min(wait - min(wait, outside) / 2.0, duration)
    base_t, base_rq, _ = hist[0]
    known = max((now_rq - base_rq) / 1e9, 0.0)
    unknown = base_t - start
    if now - base_t >= unknown:
        known += unknown * min(known / (now - base_t), 1.0)
    return min(known, duration)


def on_cpu_s(st: LoopState, start: float, duration: float) -> float | None:
    """Loop thread, at the end of a long step: the loop thread's CPU time during it, from
    the last reading before the start (CPU time between that reading and the start is
    counted half, as for the run-queue wait); None when unknown (no schedstat, no reading
    from before the start). It bounds what may be discounted as waiting: time the thread
    was on a CPU was the app's (or the GC's) and was not spent waiting for anything."""
    if st.rq_fd < 0:
        return None
    now_cpu = cpu_ns(st.rq_fd)
    now = _now()
    if now_cpu < 0:
        return None
    with st.lock:
        hist = list(st.cpu_hist)
        st.cpu_hist.append((now, now_cpu, 0.0))
    for t, cpu, _ in reversed(hist):
        if t <= start and cpu >= 0:
            ran = max((now_cpu - cpu) / 1e9, 0.0)
            outside = max((start - t) + (now - start - duration), 0.0)
            return min(ran - min(ran, outside) / 2.0, duration)
    return None


def step_cpu_s(st: LoopState) -> float | None:
    """Loop thread, at the end of a long step: its CPU time during the step, exact, when
    the step read it at its start (the machine was busy); else None."""
    if st.cpu0 < 0:
        return None
    return max(real.thread_time_ns() - st.cpu0, 0) / 1e9


def waited_s(st: LoopState, start: float, duration: float, preempted: float,
             blocked: float, cpu: float | None = None) -> float:
    """How much of a long step the loop thread spent waiting through no doing of the app:
    preempted by other processes, or kept off the GIL by the watchdog (:func:`held_s`).
    The two overlap (a thread waiting for the GIL wakes every switch interval and queues
    for a CPU too), so their sum is capped by the time the thread was off the CPU and not
    in a trapped call; without a CPU reading, the larger of the two counts.

    ``cpu``, the step's exact CPU time (:func:`step_cpu_s`), makes the cap exact: then
    ``preempted`` is the whole wait since the reading before the step
    (``preempted_s(whole=True)``), and what the cap leaves is the app's."""
    held = held_s(st, start, start + duration)
    if cpu is not None:
        return min(preempted + held, max(duration - cpu - blocked, 0.0))
    if not held:
        return preempted
    cpu = on_cpu_s(st, start, duration)
    if cpu is None:
        return max(preempted, held)
    return min(preempted + held, max(duration - cpu - blocked, 0.0))
