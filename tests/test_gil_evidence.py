"""``call="gil"`` needs evidence that a thread held the GIL, not only a late watchdog.

C work that releases the GIL (hashlib, zlib, argon2, bcrypt) in worker threads keeps the
CPUs busy: on a loaded machine the loop waits for a CPU, or for a GIL held by a thread the
OS preempted for a moment, and the workers are in user code when it looks. That is CPU
contention, not a thread holding the GIL. Threads running Python code one at a time are."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from typing import Any

import pytest

from pytest_stallguard.clock import real
from pytest_stallguard.loopwatch import watchdog
from pytest_stallguard.loopwatch.watchdog import Look, holder

# -- the decision, from the looks at the threads ---------------------------------------------

MS = 1_000_000  # ns


def look(t: float, **threads: tuple[int, int, int]) -> Look:
    """Thread name (a number as 't1') -> (CPU ms, frame id, lasti)."""
    return Look(t, {int(k[1:]): (cpu * MS, f, i) for k, (cpu, f, i) in threads.items()})


def test_threads_running_python_one_at_a_time_held_the_gil() -> None:
    # two threads ran Python (their frames moved on), 60 ms together in a 100 ms window
    before = look(0.0, t1=(0, 1, 10), t2=(0, 2, 10))
    after = look(0.100, t1=(40, 1, 22), t2=(20, 3, 10))
    found = holder(before, after, set(), waited=0.080)
    assert found is not None
    ident, evidence = found
    assert ident == 1
    assert evidence.startswith("2 thread(s) ran Python code (their frames moved on), 60.0 ms")
    assert "this one 40.0 ms" in evidence


def test_threads_inside_c_calls_running_side_by_side_are_no_evidence() -> None:
    # hashing threads: inside the same call at both looks, running side by side
    before = look(0.0, t1=(0, 1, 10), t2=(0, 2, 10), t3=(0, 3, 10))
    after = look(0.100, t1=(60, 1, 10), t2=(55, 2, 10), t3=(50, 3, 10))
    assert holder(before, after, set(), waited=0.080) is None
    # one of them finished and moved on: still side by side with the others
    after = look(0.100, t1=(60, 9, 4), t2=(55, 2, 10), t3=(50, 3, 10))
    assert holder(before, after, set(), waited=0.080) is None


def test_one_thread_inside_one_call_must_run_nearly_all_the_wait() -> None:
    before = look(0.0, t1=(0, 1, 10), t2=(0, 2, 10))
    # a C call that keeps the GIL: it ran 90 of the 100 ms the loop waited, alone
    found = holder(before, look(0.110, t1=(90, 1, 10), t2=(0, 2, 10)), set(), waited=0.100)
    assert found is not None and found[0] == 1
    assert "inside one call that kept the GIL" in found[1]
    # a GIL-releasing call that got a small share of a loaded CPU: no evidence
    assert holder(before, look(0.110, t1=(30, 1, 10), t2=(0, 2, 10)), set(), 0.100) is None


def test_python_threads_that_ran_too_little_or_beside_more_are_no_evidence() -> None:
    before = look(0.0, t1=(0, 1, 10), t2=(0, 2, 10))
    # ran 10 ms of a 100 ms wait: it slept, the loop waited on something else
    assert holder(before, look(0.120, t1=(10, 1, 30), t2=(0, 2, 10)), set(), 0.100) is None
    # ran Python 40 ms, but a thread inside a C call ran 30 ms beside it
    assert holder(before, look(0.120, t1=(40, 1, 30), t2=(30, 2, 10)), set(), 0.100) is None
    # more CPU than one at a time can give: they did not take turns on the GIL
    after = look(0.050, t1=(45, 1, 30), t2=(40, 3, 11))
    assert holder(before, after, set(), 0.040) is None
    # the skipped threads (the loops, the watchdog) are never the holder
    assert holder(before, look(0.120, t1=(90, 1, 30), t2=(0, 2, 10)), {1}, 0.100) is None


@pytest.mark.skipif(not watchdog._HAS_THREAD_CLOCKS, reason="per-thread CPU clocks (Linux)")
def test_take_look_reads_other_threads_cpu_without_their_ident_clock() -> None:
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    thread = threading.Thread(target=spin)
    thread.start()
    try:
        first = watchdog.take_look(sys._current_frames(), {}, threading.get_ident())
        real.sleep(0.05)
        second = watchdog.take_look(sys._current_frames(), {}, threading.get_ident())
    finally:
        stop.set()
        thread.join(timeout=10)
    assert thread.ident is not None
    assert threading.get_ident() not in first.threads
    assert second.threads[thread.ident][0] > first.threads[thread.ident][0]


# -- the clean twin: GIL-releasing C work in worker threads beside CPU burners ---------------

APP = """
import hashlib

from fastapi import FastAPI


def create_app():
    app = FastAPI()

    @app.post("/login")
    def login():
        # OpenSSL's PBKDF2 runs with the GIL released (about 50 ms here)
        digest = hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", 200_000)  # HASH-LINE
        return {"ok": len(digest)}

    return app
"""

# Bounded by itself too: it ends after 120 s even if the kill in the test never ran.
BURNER = (
    "import time\n"
    "end = time.monotonic() + 120\n"
    "while time.monotonic() < end:\n"
    "    pass\n"
)


def _burners(n: int) -> list[subprocess.Popen[bytes]]:
    return [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(n)]


def _stop(procs: list[subprocess.Popen[Any]]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait(timeout=10)


def test_gil_releasing_c_work_in_threads_beside_cpu_burners_is_not_the_gil(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(myapp=APP)
    pytester.syspathinsert()
    pytester.makepyfile(
        """
        import pytest
        from myapp import create_app

        @pytest.fixture
        def stall_app():
            return create_app()

        async def test_logins(stall_client):
            for _ in range(5):
                r = await stall_client.burst("POST", "/login", n=30, concurrency=30)
                assert r.statuses == {200: 30}, r.statuses
        """
    )
    burners = _burners(2)
    try:
        result = pytester.runpytest("-p", "no:asyncio", "--stall-report-json=r.json")
    finally:
        _stop(burners)
    report = json.loads((pytester.path / "r.json").read_text())
    findings = [f for t in report["tests"] for f in t["findings"]]
    gil = [f for f in findings if f.get("call") == "gil"]
    assert gil == [], gil
    assert [t["nodeid"].split("::")[1] for t in report["tests"]] == ["test_logins[asyncio]"]
    # what the burst got back was checked in the inner test (statuses); it ran to its end
    result.assert_outcomes(**({"passed": 1} if not findings else {"failed": 1}))


TP_APP = """
import time

import anyio.to_thread
from fastapi import FastAPI


def mix(h, i):
    return (h * 31 + i) & 0xFFFFFFFF  # MIX-LINE


def crunch(ms):
    # pure Python, 300 ms of this thread's CPU: it holds the GIL while it runs
    deadline = time.thread_time() + ms / 1000.0
    h = 0
    while time.thread_time() < deadline:
        for i in range(100):
            h = mix(h, i)  # CRUNCH-LINE
    return h


def create_app():
    app = FastAPI()

    @app.get("/report")
    async def report():
        return {"n": await anyio.to_thread.run_sync(crunch, 300)}

    return app
"""


def test_pure_python_threads_starving_the_loop_are_the_gil(pytester: pytest.Pytester) -> None:
    """The true positive, in the same conditions as the clean twin: four requests run a
    pure-Python loop in worker threads at once beside two CPU burners."""
    pytester.makepyfile(myapp=TP_APP)
    pytester.syspathinsert()
    pytester.makepyfile(
        """
        import anyio
        import pytest
        from myapp import create_app

        @pytest.fixture
        def stall_app():
            return create_app()

        async def test_reports(stall_client):
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(stall_client.get, "/report")
        """
    )
    burners = _burners(2)
    try:
        result = pytester.runpytest("-p", "no:asyncio", "--stall-report-json=r.json")
    finally:
        _stop(burners)
    report = json.loads((pytester.path / "r.json").read_text())
    gil = [f for t in report["tests"] for f in t["findings"] if f.get("call") == "gil"]
    assert gil, report
    written = (pytester.path / "myapp.py").read_text().splitlines()
    expected = {
        ("myapp.py", i, fn)
        for i, text in enumerate(written, 1)
        for fn, tag in (("mix", "MIX-LINE"), ("crunch", "CRUNCH-LINE"), ("crunch", "< deadline"))
        if tag in text
    }
    assert {(f["file"], f["line"], f["function"]) for f in gil} <= expected, gil
    assert all("ran Python code (their frames moved on)" in f["message"] for f in gil), gil
    result.assert_outcomes(failed=1)
