"""Guard overhead: wall time of a 2,000-request burst with the guard on vs off.

Plain script, no pytest::

    python bench/overhead.py [--rounds 7] [--requests 2000]

The app is one trivial FastAPI endpoint (``async def ping(): return {"ok": True}``); each
measurement is ``client.burst("GET", "/ping", n=2000)`` inside ``running(...)``, in a
fresh event loop (``anyio.run``), after an untimed warm-up burst of 100 on the same client;
a measurement is the fastest of ``--bursts`` (default 3) timed bursts on that client (the
minimum, because other processes on a small machine add noise of +-30% to single bursts):

* off: ``running(app, Settings(), None)``, nothing armed;
* on: ``with GuardRun(Settings()) as run:``, ``await run.enter_loop()`` first, and
  ``running(app, Settings(), run.guard)`` (traps + loop watch armed);
* blockbuster (if it installs): the same as off, inside ``blockbuster_ctx()``;
* aiocop (if it installs): its audit hook, its audit-patched stdlib functions and its
  background stack sampler cannot be removed once installed, so it is never loaded in this
  process. Each round instead runs two child processes of this script, ``--child off``
  and ``--child aiocop``, which warm up the same way and time one burst each; its ratio
  is against the child "off" of the same round. (aiocop setup, as its docs say:
  ``patch_audit_functions()``, ``start_blocking_io_detection()``, then inside the loop
  ``detect_slow_tasks(threshold_ms=20, on_slow_task=...)`` and ``activate()``.)

Modes alternate within every round (the order rotates from round to round so that no
mode always runs first). Per-round times and the median of the per-round ratios are
printed; SPEC section 7 target: on/off <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import anyio
from driver import make_app  # the same trivial app as bench/driver.py (bench/ is on sys.path)

from pytest_stallguard.client import running
from pytest_stallguard.config import Settings
from pytest_stallguard.run import GuardRun

TARGET = 1.05
WARMUP = 100




APP = make_app()


BURSTS = 3  # timed bursts per measurement; the fastest is kept (--bursts)


async def timed_burst(guard: Any, n: int) -> float:
    best = float("inf")
    async with running(APP, Settings(), guard) as client:
        await client.burst("GET", "/ping", n=WARMUP)
        for _ in range(BURSTS):
            start = time.perf_counter()
            result = await client.burst("GET", "/ping", n=n)
            best = min(best, time.perf_counter() - start)
            if result.statuses.get(200) != n or result.errors:
                raise RuntimeError(
                    f"burst failed: statuses {dict(result.statuses)}, errors {result.errors[:3]}"
                )
    return best


# -- the modes (each returns the burst's wall time in seconds) ------------------------------


def run_off(n: int) -> float:
    async def main() -> float:
        return await timed_burst(None, n)

    return anyio.run(main, backend="asyncio")


ON_FINDINGS: list[int] = []


def run_on(n: int) -> float:
    with GuardRun(Settings()) as run:

        async def main() -> float:
            await run.enter_loop()
            elapsed = await timed_burst(run.guard, n)
            await run.leave_loop()
            return elapsed

        elapsed = anyio.run(main, backend="asyncio")
    ON_FINDINGS.append(sum(f.count for f in run.guard.findings))
    return elapsed


def run_blockbuster(n: int) -> float:
    from blockbuster import blockbuster_ctx

    with blockbuster_ctx():

        async def main() -> float:
            return await timed_burst(None, n)

        return anyio.run(main, backend="asyncio")


def run_aiocop_here(n: int) -> float:
    """Only ever called in a child process (see the module docstring)."""
    import aiocop

    events: list[Any] = []
    aiocop.patch_audit_functions()
    aiocop.start_blocking_io_detection()

    patched: list[bool] = []

    async def main() -> float:
        aiocop.detect_slow_tasks(threshold_ms=20, on_slow_task=events.append)
        aiocop.activate()
        import asyncio

        patched.append(bool(getattr(asyncio.get_running_loop(), "_aiocop_patched", False)))
        try:
            return await timed_burst(None, n)
        finally:
            aiocop.deactivate()

    elapsed = anyio.run(main, backend="asyncio")
    if not patched or not patched[0]:
        raise RuntimeError("aiocop did not patch the running loop")
    CHILD_EXTRA["aiocop_slow_task_events"] = len(events)
    return elapsed


CHILD_EXTRA: dict[str, Any] = {}


def run_child(mode: str, n: int) -> float:
    out = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            *("--child", mode, "--requests", str(n), "--bursts", str(BURSTS)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode != 0:
        tail = out.stderr.strip()[-800:]
        raise RuntimeError(f"child {mode} failed (rc {out.returncode}): {tail}")
    data = json.loads(out.stdout.strip().splitlines()[-1])
    if "aiocop_slow_task_events" in data:
        AIOCOP_EVENTS.append(data["aiocop_slow_task_events"])
    return float(data["elapsed_s"])


AIOCOP_EVENTS: list[int] = []


# -- availability of the peers -----------------------------------------------------------------


def probe_blockbuster() -> str | None:
    """None if usable, else why not."""
    try:
        from blockbuster import blockbuster_ctx
    except ImportError as exc:
        return f"not installed ({exc})"
    try:
        from blockbuster import BlockingError

        async def armed() -> bool:
            try:
                time.sleep(0)
            except BlockingError:
                return True
            return False

        with blockbuster_ctx():
            if not anyio.run(armed, backend="asyncio"):
                return "installed but time.sleep in the loop was not caught: not armed"
        run_blockbuster(50)
    except Exception as exc:
        return f"installed ({version('blockbuster')}) but the burst failed: {exc!r}"
    return None


def probe_aiocop() -> str | None:
    try:
        import importlib.util

        if importlib.util.find_spec("aiocop") is None:
            return "not installed"
        run_child("aiocop", 50)
    except Exception as exc:
        return f"installed but the burst failed: {exc!r}"
    return None


def version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v(dist)
    except PackageNotFoundError:
        return "-"


def main() -> None:
    global BURSTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--bursts", type=int, default=BURSTS)
    parser.add_argument("--child", choices=("off", "aiocop"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = args.requests
    BURSTS = args.bursts

    if args.child:
        elapsed = run_off(n) if args.child == "off" else run_aiocop_here(n)
        print(json.dumps({"elapsed_s": elapsed, **CHILD_EXTRA}))
        return

    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; burst of {n} x GET /ping "
        f"(concurrency None = all at once), {args.rounds} rounds, each time the fastest of "
        f"{BURSTS} bursts on one client; load average {os.getloadavg()[0]:.2f}; "
        f"blockbuster {version('blockbuster')}, aiocop {version('aiocop')}"
    )
    modes: dict[str, Callable[[int], float]] = {"off": run_off, "on": run_on}
    bb = probe_blockbuster()
    if bb is None:
        modes["blockbuster"] = run_blockbuster
    else:
        print(f"blockbuster: {bb}; not measured")
    ac = probe_aiocop()
    if ac is None:
        modes["child-off"] = lambda n: run_child("off", n)
        modes["child-aiocop"] = lambda n: run_child("aiocop", n)
    else:
        print(f"aiocop: {ac}; not measured")
    sys.stdout.flush()

    names = list(modes)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        k = r % len(names)
        order = names[k:] + names[:k]
        for name in order:
            times[name].append(modes[name](n))
        cells = "  ".join(f"{name} {times[name][-1] * 1000:7.1f} ms" for name in names)
        print(f"round {r + 1}: {cells}  | on/off {times['on'][-1] / times['off'][-1]:.3f}")
        sys.stdout.flush()

    def ratios(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(times[a], times[b], strict=True)]

    print()
    print(
        "median wall time per burst: "
        + ", ".join(f"{name} {statistics.median(times[name]) * 1000:.1f} ms" for name in names)
    )
    on = ratios("on", "off")
    verdict = "meets" if statistics.median(on) <= TARGET else "MISSES"
    print(
        f"stallguard on/off: median ratio {statistics.median(on):.3f} "
        f"(per round {', '.join(f'{x:.3f}' for x in on)}) -> {verdict} target <= {TARGET}"
    )
    print(f"  findings recorded by the guard in the on rounds: {ON_FINDINGS} (expected all 0)")
    if "blockbuster" in times:
        b = ratios("blockbuster", "off")
        print(
            f"blockbuster/off: median ratio {statistics.median(b):.3f} "
            f"(per round {', '.join(f'{x:.3f}' for x in b)})"
        )
    if "child-aiocop" in times:
        a = ratios("child-aiocop", "child-off")
        print(
            f"aiocop/off (child processes, against the same round's child off): median ratio "
            f"{statistics.median(a):.3f} (per round {', '.join(f'{x:.3f}' for x in a)})"
        )
        print(f"  aiocop slow-task events per child (probe + rounds): {AIOCOP_EVENTS}")
        c = ratios("child-off", "off")
        print(
            f"  (child off / in-process off: median {statistics.median(c):.3f}; "
            "how comparable the two baselines are)"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
