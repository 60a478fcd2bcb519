"""``call="gil"`` needs evidence that a thread held the GIL, not only a late watchdog.

C work that releases the GIL (hashlib, zlib, argon2, bcrypt) in worker threads keeps the
CPUs busy: on a loaded machine the watchdog wakes late because it waits for a CPU, and the
worker is in user code when it looks. That is CPU contention, not a thread holding the
GIL."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from typing import Any

import pytest

from pytest_stallguard.clock import real
from pytest_stallguard.loopwatch import watchdog
from pytest_stallguard.loopwatch.watchdog import gil_evidence

THRESHOLD = 0.020


# -- the decision, from the watchdog's own readings ------------------------------------------


def test_lateness_spent_waiting_for_a_cpu_is_not_the_gil() -> None:
    # woke 300 ms late, 280 ms of it in the run queue: 20 ms on the GIL, under 2x threshold
    blame, gil, evidence = gil_evidence(0.300, 0.300, 0.280, THRESHOLD)
    assert not blame
    assert gil == pytest.approx(0.020)
    assert "woke 300.0 ms late, of which 280.0 ms waiting for a CPU" in evidence
    assert "20.0 ms waiting for the GIL" in evidence


def test_lateness_not_spent_waiting_for_a_cpu_is_the_gil() -> None:
    # the same lateness with 50 ms in the run queue: 250 ms waiting for the GIL
    blame, gil, evidence = gil_evidence(0.300, 0.300, 0.050, THRESHOLD)
    assert blame
    assert gil == pytest.approx(0.250)
    assert evidence == (
        "the watchdog woke 300.0 ms late, of which 50.0 ms waiting for a CPU (other threads "
        "and processes) and 250.0 ms waiting for the GIL held by that thread"
    )


def test_gil_wait_is_at_most_the_starved_time_and_readings_are_clamped() -> None:
    # the loop ran until 100 ms before the wake: at most those 100 ms are blamed
    blame, gil, _ = gil_evidence(0.100, 0.300, 0.0, THRESHOLD)
    assert blame and gil == pytest.approx(0.100)
    # a run-queue growth larger than the lateness (it includes the read itself): no GIL
    blame, gil, evidence = gil_evidence(0.300, 0.300, 0.500, THRESHOLD)
    assert not blame and gil == 0.0
    assert "of which 300.0 ms waiting for a CPU" in evidence


def test_without_schedstat_the_lateness_is_blamed_and_the_doubt_said() -> None:
    blame, gil, evidence = gil_evidence(0.300, 0.320, None, THRESHOLD)
    assert blame and gil == pytest.approx(0.300)
    assert "woke 320.0 ms late" in evidence
    assert "CPU contention could not be ruled out" in evidence
    blame, _, _ = gil_evidence(0.030, 0.030, None, THRESHOLD)
    assert not blame


def test_threads_running_side_by_side_do_not_hold_the_gil() -> None:
    # 250 ms not spent waiting for a CPU, but the threads in user code ran 2.6 at a time
    blame, gil, evidence = gil_evidence(0.300, 0.300, 0.050, THRESHOLD, together=2.6)
    assert not blame
    assert "ran side by side (2.6 at a time): they release the GIL" in evidence
    blame, gil, evidence = gil_evidence(0.300, 0.300, 0.050, THRESHOLD, together=1.1)
    assert blame and gil == pytest.approx(0.250)
    assert "ran one at a time (1.1 at a time)" in evidence


def _spin_python(stop: threading.Event) -> None:
    while not stop.is_set():
        sum(range(1000))


def _spin_pbkdf2(stop: threading.Event) -> None:
    while not stop.is_set():
        hashlib.pbkdf2_hmac("sha256", b"pw", b"salt", 20_000)


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs /proc (Linux)")
def test_threads_together_tells_gil_releasing_work_from_gil_holding_work() -> None:
    """Measured on real threads: four threads hashing with hashlib (the GIL released) run
    side by side, or wait for a CPU side by side on a loaded machine; four pure-Python
    threads take turns on the GIL."""
    measured = {}
    for name, target in (("pbkdf2", _spin_pbkdf2), ("python", _spin_python)):
        stop = threading.Event()
        threads = [threading.Thread(target=target, args=(stop,)) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            real.sleep(0.05)
            idents = [t.ident for t in threads if t.ident is not None]
            looks = [watchdog._threads_together(idents, 0.040) for _ in range(5)]
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=10)
        assert all(v is not None for v in looks), looks
        measured[name] = sorted(v for v in looks if v is not None)[2]  # the median
    assert measured["pbkdf2"] >= 1.5 * measured["python"], measured
    assert measured["pbkdf2"] >= watchdog._TOGETHER, measured
    assert measured["python"] < watchdog._TOGETHER, measured


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
