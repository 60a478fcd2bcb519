"""The watchdog's nap in C (``_cstep.nap``): while the loops run short steps, it keeps its
polls off the GIL, and it comes back for a step that may need a sample, an idle loop, a
new loop or thread, a stop.

Durations are compared with one measured in the same test (a nap that had nothing to
come back for runs to its limit), never with a constant."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from pytest_stallguard.clock import real
from pytest_stallguard.loopwatch import LoopWatch, steps, watchdog

cstep = steps._cstep
pytestmark = pytest.mark.skipif(cstep is None, reason="the C module is not built here")

# Looks 20 ms apart: the thread that plays the busy loop below may be off a CPU for a few
# milliseconds on a small machine, and the nap must not take that for an idle loop.
INTERVAL = 0.02
EARLY = 0.01  # a step this old is worth the GIL
LIMIT = 0.6  # where a nap with nothing to come back for ends


def _state(start: float = 0.0, seq: int = 0, active: bool = True) -> Any:
    st = cstep.StepState()
    st.active, st.start, st.seq = active, start, seq
    return st


def _nap(states: list[Any], stop: bytearray | None = None,
         dicts: tuple[dict[Any, Any], ...] = (),
         cpus: tuple[tuple[int, int], ...] = ()) -> float:
    """How long the nap lasted, in seconds."""
    began = real.perf_counter()
    cstep.nap(tuple(states), INTERVAL, EARLY, 10.0, LIMIT,
              stop if stop is not None else bytearray(1), dicts, cpus)
    return real.perf_counter() - began


def _cpu_of(thread: threading.Thread) -> tuple[int, int]:
    assert thread.native_id is not None
    clock = watchdog._clock_of(thread.native_id)
    return clock, watchdog._thread_cpu_ns(clock)


@contextmanager
def busy(st: Any) -> Iterator[None]:
    """A loop thread running short steps on ``st`` (0.1 ms each, back to back), as the
    loop hooks note them."""
    done = threading.Event()

    def run() -> None:
        while not done.is_set():
            st.seq += 1
            st.start = start = real.perf_counter()
            while real.perf_counter() - start < 0.0001:
                pass
            st.start = 0.0

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(5)


def _later(seconds: float, action: Any) -> threading.Timer:
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


def test_a_nap_beside_short_steps_lasts_to_its_limit_and_a_due_step_ends_it() -> None:
    """Short steps give the nap nothing to come back for; a step older than ``early``, or
    an idle loop, ends it at the next look."""
    st = _state()
    with busy(st):
        beside_short = _nap([st])
    due = _nap([_state(start=real.perf_counter() - 0.05, seq=7)])
    idle = _nap([_state(seq=3)])  # no step now, none since the nap began
    assert beside_short >= LIMIT
    assert due < beside_short / 10
    assert idle < beside_short / 10


def test_a_stop_a_new_loop_or_thread_ends_the_nap() -> None:
    st = _state()
    stop = bytearray(1)
    loops: dict[Any, Any] = {}
    with busy(st):
        full = _nap([st], bytearray(1), (loops,))
        _later(0.02, lambda: stop.__setitem__(0, 1))
        stopped = _nap([st], stop, (loops,))
        _later(0.02, lambda: loops.__setitem__("another loop", None))
        grown = _nap([st], bytearray(1), (loops,))
    assert stopped < full / 4
    assert grown < full / 4


def test_another_thread_that_runs_ends_the_nap_and_one_that_waits_does_not() -> None:
    """The threads that could hold the GIL (the nap is given their CPU clocks): one idle
    in a wait leaves the nap to its limit; one that runs (here: Python code, which needs
    the GIL) ends it at the next look, for the watchdog's Python side to judge."""
    st = _state()
    go, done = threading.Event(), threading.Event()

    def worker() -> None:
        go.wait(10)
        while not done.is_set():
            pass

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    try:
        with busy(st):
            waiting = _nap([st], cpus=(_cpu_of(thread),))
            go.set()
            running = _nap([st], cpus=(_cpu_of(thread),))
    finally:
        go.set()
        done.set()
        thread.join(5)
    assert waiting >= LIMIT
    assert running < waiting / 4


def test_an_inactive_loop_is_not_looked_at() -> None:
    """A detached loop's state (active False) with an old start: no sample to take."""
    st = _state()
    gone = _state(start=real.perf_counter() - 1.0, seq=1, active=False)
    with busy(st):
        both = _nap([st, gone])
    assert both >= LIMIT


def test_bad_input_is_named() -> None:
    with pytest.raises(TypeError, match="loop 0 is 'nope', not a StepState"):
        cstep.nap(("nope",), INTERVAL, EARLY, 1.0, LIMIT, bytearray(1), (), ())
    with pytest.raises(ValueError, match=r"interval 0\.0, give seconds > 0"):
        cstep.nap((), 0.0, EARLY, 1.0, LIMIT, bytearray(1), (), ())
    with pytest.raises(TypeError, match="got 3 argument"):
        cstep.nap((), INTERVAL, EARLY)
    with pytest.raises(TypeError, match="is not a dict"):
        cstep.nap((), INTERVAL, EARLY, 1.0, LIMIT, bytearray(1), ([],), ())
    with pytest.raises(TypeError, match=r"thread 0 is \('x', 1\), not \(clock id, CPU ns\)"):
        cstep.nap((), INTERVAL, EARLY, 1.0, LIMIT, bytearray(1), (), (("x", 1),))


def _turns(monkeypatch: pytest.MonkeyPatch, python: bool) -> tuple[int, int]:
    """(the watchdog's Python turns, loop steps) while an attached loop runs short steps
    for a quarter of a second."""
    if python:
        monkeypatch.setattr(steps, "_cstep", None)
    turns = [0]
    look = watchdog.Watchdog.look

    def counted(self: watchdog.Watchdog) -> None:
        turns[0] += 1
        look(self)
        return None  # as with no other thread (a suite's idle leftovers are others)

    monkeypatch.setattr(watchdog.Watchdog, "look", counted)
    watch = LoopWatch(20)

    async def main() -> int:
        watch.attach()
        watch.start()
        st = next(iter(watch._mine.values()))
        turns[0] = 0
        seq = st.seq
        end = real.perf_counter() + 0.25
        while real.perf_counter() < end:
            await asyncio.sleep(0)
        return int(st.seq - seq)

    try:
        ran = asyncio.run(main())
    finally:
        watch.stop()
        watch.detach_all()
    return turns[0], ran


def test_the_watchdog_takes_no_gil_from_a_loop_of_short_steps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The point of the nap: with the Python sleep the watchdog takes its turn (and the GIL
    from the loop thread) at every poll; with the nap in C only at its limit."""
    python_turns, python_steps = _turns(monkeypatch, python=True)
    monkeypatch.undo()
    c_turns, c_steps = _turns(monkeypatch, python=False)
    assert python_steps > 100 and c_steps > 100  # the loop was busy in both
    assert c_turns * 5 < python_turns, (c_turns, python_turns)


def test_stop_ends_a_nap_in_c(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stop does not wait for the nap's limit (made a minute here): the watchdog thread
    is gone when stop() returns, its join bounded by a second."""
    monkeypatch.setattr(watchdog, "C_NAP_LIMIT_S", 60.0)
    watch = LoopWatch(20)
    thread: list[threading.Thread | None] = [None]

    async def main() -> None:
        watch.attach()
        watch.start()
        thread[0] = watch._watchdog.thread
        end = real.perf_counter() + 0.2
        while real.perf_counter() < end:
            await asyncio.sleep(0)
        watch.stop()

    try:
        asyncio.run(main())
    finally:
        watch.stop()
        watch.detach_all()
    assert thread[0] is not None
    assert not thread[0].is_alive()
