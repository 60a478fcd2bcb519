"""Calibrate the default ``max_canary_slowdown`` (and look at ``FLOOR_MS``).

Plain script, no pytest::

    python bench/canary.py [--trials 15]

Two endpoints under a burst of 50, with ``/health`` as the canary:

* ``/clean`` awaits ``anyio.sleep(0.1)`` (a slow upstream, loop free): must stay under
  the limit;
* ``/hold`` busy-loops 40 ms per request on the loop thread: must go over it.

Each trial starts a fresh app (so the canary baseline is re-measured, as in a test), in
two conditions: a quiet machine, and with two CPU-burning processes beside it. It prints
min/median/max slowdown per endpoint, the margin (min hold / max clean), whether the
current default separates them in every trial, and the geometric middle of the gap.
Extras: 100- and 200-request clean bursts, concurrency=10 (the default is concurrency=None, all
at once), and small holds to see what the default limit can still catch.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import anyio
from fastapi import FastAPI

from pytest_stallguard import canary as canary_mod
from pytest_stallguard.client import running
from pytest_stallguard.config import DEFAULT_MAX_CANARY_SLOWDOWN, Settings
from pytest_stallguard.model import CanaryResult

LIMIT = DEFAULT_MAX_CANARY_SLOWDOWN


def hold(ms: float) -> None:
    end = time.perf_counter() + ms / 1000.0
    while time.perf_counter() < end:
        pass


def build_app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/clean")
    async def clean() -> dict[str, str]:
        await anyio.sleep(0.1)
        return {"ok": "yes"}

    @app.get("/hold")
    async def hold40() -> dict[str, str]:
        hold(40.0)
        return {"ok": "yes"}

    for ms in (1, 2, 5, 10):

        def make(ms: int) -> Callable[[], object]:
            async def small() -> dict[str, str]:
                hold(float(ms))
                return {"ok": "yes"}

            return small

        app.get(f"/hold{ms}")(make(ms))

    return app


APP = build_app()


async def one_burst(path: str, n: int, concurrency: int | None = None) -> CanaryResult:
    async with running(APP, Settings(), None) as client:
        result = await client.burst("GET", path, n=n, concurrency=concurrency, canary="/health")
    assert result.canary is not None
    bad = {s: c for s, c in result.statuses.items() if s != 200}
    if bad or result.errors:
        raise RuntimeError(f"{path}: unexpected statuses {bad} / errors {result.errors}")
    return result.canary


def collect(path: str, n: int, trials: int, concurrency: int | None = None) -> list[CanaryResult]:
    out: list[CanaryResult] = []

    async def main() -> None:
        for _ in range(trials):
            out.append(await one_burst(path, n, concurrency))

    anyio.run(main, backend="asyncio")
    return out


def line(label: str, results: list[CanaryResult]) -> str:
    s = [r.slowdown for r in results]
    b = [r.baseline_p95_ms for r in results]
    p = [r.p95_ms for r in results]
    return (
        f"  {label:<24} slowdown min/med/max {min(s):8.2f} {statistics.median(s):8.2f} "
        f"{max(s):8.2f}x | baseline p95 ms {min(b):.3f}..{max(b):.3f} "
        f"| p95 ms {min(p):.2f}..{max(p):.2f} | probes {min(r.probes for r in results)}+"
    )


def condition(name: str, trials: int) -> dict[str, list[CanaryResult]]:
    print(f"== {name} ({trials} trials, n=50, every_ms=10, FLOOR_MS={canary_mod.FLOOR_MS:g})")
    sys.stdout.flush()
    runs = {
        "clean n=50": collect("/clean", 50, trials),
        "hold n=50": collect("/hold", 50, trials),
        "clean n=100": collect("/clean", 100, max(3, trials // 3)),
        "clean n=200": collect("/clean", 200, max(3, trials // 3)),
        "clean n=50 conc=10": collect("/clean", 50, max(3, trials // 3), 10),
        "hold n=50 conc=10": collect("/hold", 50, max(3, trials // 3), 10),
    }
    for label, results in runs.items():
        print(line(label, results))
    cleans = [r.slowdown for k in runs if k.startswith("clean") for r in runs[k]]
    holds = [r.slowdown for k in runs if k.startswith("hold") for r in runs[k]]
    clean_max, hold_min = max(cleans), min(holds)
    middle = math.sqrt(clean_max * hold_min)
    print(
        f"  margin (min hold / max clean, all variants): {hold_min:.2f} / {clean_max:.2f} "
        f"= {hold_min / clean_max:.1f}x; geometric middle {middle:.1f}x"
    )
    # Unfloored view: what the ratio would be against the raw baseline.
    raw = [r.p95_ms / r.baseline_p95_ms for k in runs if k.startswith("clean") for r in runs[k]]
    print(f"  clean slowdown without the floor (raw baseline): max {max(raw):.2f}x")
    small: dict[str, list[CanaryResult]] = {}
    for ms in (1, 2, 5, 10):
        small[f"hold{ms}ms n=50"] = collect(f"/hold{ms}", 50, 3)
    for label, results in small.items():
        flag = (
            "caught"
            if all(r.slowdown > LIMIT for r in results)
            else ("missed" if all(r.slowdown <= LIMIT for r in results) else "flaky")
        )
        print(line(label, results) + f" | {flag} at {LIMIT:g}x")
    print()
    sys.stdout.flush()
    return runs


def burners(count: int) -> list[subprocess.Popen[bytes]]:
    procs = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
    except BaseException:
        stop(procs)
        raise
    return procs


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=15)
    args = parser.parse_args()
    started = time.perf_counter()

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, default limit {LIMIT:g}x")
    results = {"quiet": condition("quiet", args.trials)}
    procs = burners(2)
    try:
        time.sleep(0.5)  # let them get going
        results["2 CPU burners"] = condition("2 CPU burners", args.trials)
    finally:
        stop(procs)

    def verdict(label: str, keep: Callable[[str], bool]) -> None:
        clean_max, hold_min, every = 0.0, math.inf, True
        for runs in results.values():
            cleans = [
                r.slowdown for k in runs if keep(k) and k.startswith("clean") for r in runs[k]
            ]
            holds = [r.slowdown for k in runs if keep(k) and k.startswith("hold") for r in runs[k]]
            clean_max, hold_min = max(clean_max, max(cleans)), min(hold_min, min(holds))
            every = every and max(cleans) < LIMIT < min(holds)
        print(
            f"RECOMMENDATION ({label}): default {LIMIT:g}x "
            f"{'separates' if every else 'does NOT separate'} clean from hold in every trial "
            f"of both conditions (max clean {clean_max:.2f}x < {LIMIT:g} < min hold "
            f"{hold_min:.2f}x is {every}); geometric middle {math.sqrt(clean_max * hold_min):.1f}x"
        )

    verdict("n=50, concurrency=None: the brief's pair", lambda k: k in ("clean n=50", "hold n=50"))
    verdict("all clean/hold variants incl. n=100, n=200, conc=10", lambda k: True)
    print(f"(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
