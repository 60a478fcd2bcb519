"""``call="gil"`` needs evidence that a thread held the GIL, not only a late watchdog.

C work that releases the GIL (hashlib, zlib, argon2, bcrypt) in worker threads keeps the
CPUs busy: on a loaded machine the loop waits for a CPU, or for a GIL held by a thread the
OS preempted for a moment, and the workers are in user code when it looks. That is CPU
contention, not a thread holding the GIL. Threads running Python code one at a time are."""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from pytest_stallguard.clock import real
from pytest_stallguard.loopwatch import watchdog
from pytest_stallguard.loopwatch.watchdog import Look, holder

# -- the decision, from the looks at the threads ---------------------------------------------

MS = 1_000_000  # ns
PY, KEEPS, RELEASES, CALL = watchdog.PYTHON, watchdog.KEEPS, watchdog.RELEASES, watchdog.CALL
WAITS, NEAR = watchdog.WAITS, watchdog.NEAR_RELEASE


def look(t: float, **threads: tuple[int, str]) -> Look:
    """Thread name ('t1': ident 1) -> (CPU ms, what its innermost frame was doing)."""
    return Look(t, {int(k[1:]): (cpu * MS, 0, 0, kind) for k, (cpu, kind) in threads.items()})


def test_threads_running_python_one_at_a_time_held_the_gil() -> None:
    # two threads ran Python (one caught between bytecodes), 60 ms in a 100 ms window
    before = look(0.0, t1=(0, PY), t2=(0, CALL))
    after = look(0.100, t1=(40, PY), t2=(20, CALL))
    found = holder(before, after, set(), waited=0.080)
    assert found is not None
    ident, evidence = found
    assert ident == 1
    assert evidence.startswith("this thread was running Python code (stopped between bytecodes")
    assert "ran 40.0 ms of CPU in the 100.0 ms window" in evidence
    assert "the threads that can hold the GIL ran 60.0 ms, one at a time" in evidence


def test_a_c_call_that_keeps_the_gil_is_evidence() -> None:
    found = holder(look(0.0, t1=(0, KEEPS)), look(0.110, t1=(90, KEEPS)), set(), 0.100)
    assert found is not None and found[0] == 1
    assert "was at a C call that keeps the GIL" in found[1]


def test_threads_inside_calls_that_release_the_gil_are_no_evidence() -> None:
    # hashing threads, however late the loop got the GIL back
    before = look(0.0, t1=(0, RELEASES), t2=(0, RELEASES), t3=(0, RELEASES))
    after = look(0.100, t1=(60, RELEASES), t2=(55, RELEASES), t3=(50, RELEASES))
    assert holder(before, after, set(), waited=0.080) is None
    # one finished its hash and was caught in Python code: its CPU went to the hash
    after = look(0.100, t1=(60, PY), t2=(55, RELEASES), t3=(50, RELEASES))
    assert holder(before, after, set(), waited=0.080) is None
    # one thread caught in Python, but hashing threads ran beside it
    before = look(0.0, t1=(0, PY), t2=(0, RELEASES))
    after = look(0.100, t1=(40, PY), t2=(30, RELEASES))
    assert holder(before, after, set(), waited=0.080) is None


def test_a_worker_idle_at_the_start_is_judged_by_what_it_did_after() -> None:
    """An idle worker waits in queue.get() (a blocking wait that releases the GIL) when the
    window opens, then picks up json.dumps and holds the GIL: its CPU in the window is the
    dumps call's. (Judged by its state at the start, it counted as releasing: no finding for
    a true hold, tests/test_loopwatch.py::test_gil_held_by_a_worker_thread.)"""
    found = holder(look(0.0, t1=(0, WAITS)), look(0.600, t1=(370, KEEPS)), set(), 0.466)
    assert found is not None and found[0] == 1
    assert "idle in a blocking wait when it opened: its CPU was spent after that" in found[1]
    found = holder(look(0.0, t1=(0, WAITS)), look(0.120, t1=(90, PY)), set(), 0.100)
    assert found is not None and found[0] == 1
    # but a thread in GIL-releasing work when the window opened still counts as releasing
    assert holder(look(0.0, t1=(0, RELEASES)), look(0.600, t1=(370, KEEPS)), set(), 0.466) is None


def test_python_code_beside_a_gil_releasing_call_is_no_evidence() -> None:
    # caught in the Python code of a function that hashes: its CPU may be the hash's
    before = look(0.0, t1=(0, WAITS), t2=(0, WAITS))
    assert holder(before, look(0.120, t1=(90, NEAR), t2=(0, WAITS)), set(), 0.100) is None
    assert holder(before, look(0.120, t1=(50, PY), t2=(40, NEAR)), set(), 0.100) is None


def test_other_c_calls_alone_are_no_evidence() -> None:
    # a C call of unknown kind: could release the GIL
    assert holder(look(0.0, t1=(0, CALL)), look(0.110, t1=(90, CALL)), set(), 0.100) is None


def test_threads_that_ran_too_little_or_too_much_together_are_no_evidence() -> None:
    before = look(0.0, t1=(0, PY), t2=(0, CALL))
    # ran 10 ms of a 100 ms wait: it slept, the loop waited on something else
    assert holder(before, look(0.120, t1=(10, PY), t2=(0, CALL)), set(), 0.100) is None
    # more CPU than one at a time can give: they did not take turns on the GIL
    assert holder(before, look(0.050, t1=(45, PY), t2=(40, CALL)), set(), 0.040) is None
    # the skipped threads (the loops, the watchdog) are never the holder
    assert holder(before, look(0.120, t1=(90, PY), t2=(0, CALL)), {1}, 0.100) is None


def _spin() -> None:
    deadline = time.thread_time() + 0.3
    while time.thread_time() < deadline:
        _mix(1, 2)


def _mix(a: int, b: int) -> int:
    return (a * 31 + b) & 0xFFFF


def _hash() -> None:
    deadline = time.thread_time() + 0.3
    while time.thread_time() < deadline:
        hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", 20_000)


def _idle(stop: threading.Event) -> None:
    q: queue.Queue[int] = queue.Queue()
    while not stop.is_set():
        with contextlib.suppress(queue.Empty):
            q.get(timeout=0.05)


ROWS = [{"id": i, "name": f"row {i}", "tags": ["a", "b"]} for i in range(20_000)]


def _dumps(rows: list[dict[str, object]]) -> None:
    # The rows are built before the thread starts: building them is Python (a busy machine
    # used to catch the thread there in a third of its samples).
    deadline = time.thread_time() + 0.3
    while time.thread_time() < deadline:
        json.dumps(rows)


def _hash_then_python() -> None:
    deadline = time.thread_time() + 0.3
    while time.thread_time() < deadline:
        digest = hashlib.sha256(b"x" * 64).digest()
        for _ in range(2_000):
            digest = digest[1:] + digest[:1]


def test_doing_tells_an_idle_worker_and_the_json_encoder() -> None:
    """An idle worker in queue.get() waits (no CPU); a thread inside json.dumps is in a C
    call that keeps the GIL, although the line that calls the C encoder names no callable
    known to keep it; Python code of a function that hashes is near a releasing call."""
    stop = threading.Event()
    threads = {
        WAITS: threading.Thread(target=_idle, args=(stop,)),
        KEEPS: threading.Thread(target=_dumps, args=(ROWS,)),
        NEAR: threading.Thread(target=_hash_then_python),
    }
    for thread in threads.values():
        thread.start()
    seen: dict[str, list[str]] = {kind: [] for kind in threads}
    try:
        for _ in range(40):
            real.sleep(0.005)
            frames = sys._current_frames()
            for kind, thread in threads.items():
                frame = frames.get(thread.ident or -1)
                if frame is not None and thread.is_alive():
                    seen[kind].append(watchdog.doing(frame))
            del frames, frame
    finally:
        stop.set()
        for thread in threads.values():
            thread.join(timeout=10)
    for kind, kinds in seen.items():
        assert kinds and kinds.count(kind) >= 0.7 * len(kinds), (kind, kinds)


# _spin hands the GIL over at its loop's C call (time.thread_time, which keeps it) or at
# the entry of _mix (Python; more often on a busy machine): both are holding it.
@pytest.mark.parametrize(
    ("target", "expected"), [(_spin, {KEEPS, PY}), (_hash, {RELEASES})], ids=["spin", "hash"]
)
def test_doing_tells_python_from_a_gil_releasing_call(target: Any, expected: set[str]) -> None:
    thread = threading.Thread(target=target)
    thread.start()
    seen: list[str] = []
    try:
        while thread.is_alive() and len(seen) < 20:
            real.sleep(0.005)
            frame = sys._current_frames().get(thread.ident or -1)
            if frame is not None:
                seen.append(watchdog.doing(frame))
            del frame
    finally:
        thread.join(timeout=10)
    assert seen and sum(kind in expected for kind in seen) >= 0.8 * len(seen), seen


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


@pytest.mark.skipif(not watchdog._HAS_THREAD_CLOCKS, reason="per-thread CPU clocks (Linux)")
@pytest.mark.parametrize("name", ["stallguard-helper", "app-worker"])
def test_only_threads_of_the_app_are_looked_at(name: str) -> None:
    """The watchdog looks at the threads (a GIL holder's evidence) only when one that is
    not the plugin's own runs: its helper threads (``stallguard-...``) never hold the GIL
    for long, and a look at every wake costs the loop the GIL."""
    from pytest_stallguard.loopwatch import LoopWatch

    watch = LoopWatch(20)
    dog = watchdog.Watchdog(watch)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name=name, daemon=True)
    thread.start()
    try:
        helper = name.startswith(watchdog.HELPER_PREFIX)
        assert (thread.ident in dog._ours(sys._current_frames())) is helper
        # Any other thread of this process (an idle worker a previous test left, a thread
        # threading does not know, such as xdist's) counts as the app's: the look itself
        # is checked when none runs. The threads as the watchdog sees them.
        names = {t.ident: t.name for t in threading.enumerate()}
        others = [ident for ident in sys._current_frames()
                  if ident not in (thread.ident, threading.get_ident())
                  and not names.get(ident, "").startswith(watchdog.HELPER_PREFIX)]
        look = dog.look()
    finally:
        stop.set()
        thread.join(timeout=10)
    if helper and not others:
        assert look is None
    elif not helper:
        assert look is not None and thread.ident in look.threads


# -- the clean twin: GIL-releasing C work in worker threads beside CPU burners ---------------

APP = """
import hashlib
import os
import zlib

import argon2
import bcrypt
from fastapi import FastAPI

# each about 50 ms of CPU here, all in C code that releases the GIL for its work
HASHER = argon2.PasswordHasher(time_cost=6, memory_cost=8192, parallelism=1)
SALT = bcrypt.gensalt(rounds=10)
BIG = b"x" * (64 << 20)
NOISE = os.urandom(2 << 20)


def create_app():
    app = FastAPI()

    @app.post("/login/pbkdf2")
    def pbkdf2():
        return {"n": len(hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", 200_000))}

    @app.post("/login/argon2")
    def argon2_login():
        return {"n": len(HASHER.hash("pw"))}

    @app.post("/login/bcrypt")
    def bcrypt_login():
        return {"n": len(bcrypt.hashpw(b"pw", SALT))}

    @app.post("/upload/sha256")
    def sha256():
        return {"n": len(hashlib.sha256(BIG).hexdigest())}

    @app.post("/upload/zlib")
    def compress():
        return {"n": len(zlib.compress(NOISE, 6))}

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

        PATHS = ["/login/pbkdf2", "/login/argon2", "/login/bcrypt", "/upload/sha256",
                 "/upload/zlib"]

        async def test_logins(stall_client):
            for path in PATHS * 2:
                r = await stall_client.burst("POST", path, n=30, concurrency=30)
                assert r.statuses == {200: 30}, (path, r.statuses)
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
    """The true positive, in the same conditions as the clean twin: eight requests run a
    pure-Python loop in worker threads at once beside two CPU burners (they take turns on
    the GIL with the loop)."""
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
                for _ in range(8):
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
    # any line of the two functions (a thread made to give the GIL up on entering mix()
    # is at its def line)
    written = (pytester.path / "myapp.py").read_text().splitlines()
    first = {fn: next(i for i, t in enumerate(written, 1) if f"def {fn}(" in t)
             for fn in ("mix", "crunch", "create_app")}
    expected = {("myapp.py", i, "mix") for i in range(first["mix"], first["crunch"])} | {
        ("myapp.py", i, "crunch") for i in range(first["crunch"], first["create_app"])
    }
    assert {(f["file"], f["line"], f["function"]) for f in gil} <= expected, gil
    evidence = ("this thread was running Python code", "this thread was at a C call that keeps")
    assert all(any(e in f["message"] for e in evidence) for f in gil), gil
    result.assert_outcomes(failed=1)
