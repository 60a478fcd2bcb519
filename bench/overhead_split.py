"""Where the guard's cost goes: the same 2,000-request burst with one part switched off.

Plain script, no pytest::

    python bench/overhead_split.py [--rounds 13] [--requests 2000] [--bursts 5]
    python bench/overhead_split.py --count instructions [--cache] [--jobs 2]

Same app and burst as ``bench/overhead.py``'s fixture path. Every configuration runs in a
fresh child process of this script (the traps' audit hook cannot be removed, and memory
left by one configuration would weigh on the next), the configurations alternating in an
order that rotates from round to round; a child keeps the fastest of ``--bursts`` timed
bursts after a warm-up of 100. The configurations:

* ``off``: nothing armed;
* ``on``: ``GuardRun(Settings())`` as a test gets it;
* ``on - audit``, ``on - watchdog``, ``on - traps``, ``on - leak check``: ``on`` with that
  part off (``audit.enabled = False``; the watchdog thread not started, a bench-only
  patch; ``Settings(traps="off")``; ``Settings(leak_check=False)``);
* ``step hooks only``: all four off (the loop watch's step timing and the request labels).

Prints the median wall time per request of each, its ratio to ``off``, and each part's
share: ``on`` minus ``on`` without it, in microseconds per request and in points of the
``off`` time. The shares need not add up to the whole: the parts share the loop thread's
caches and the GIL. Single children vary by several percent; read the medians.

``--count instructions`` (needs valgrind) counts instead of timing: each configuration's
child runs under ``valgrind --tool=callgrind`` twice, with a burst of 200 and one of
1,200 requests, and the difference over 1,000 is what one request costs in machine
instructions, the same in every run whatever else the machine does (so a change of one
point shows). ``--cache`` adds the level-1 cache misses per request, as callgrind
simulates them; on this stack they explain much of what instructions alone do not. The
watchdog thread is off in every configuration there: it wakes on the wall clock, which
valgrind slows some fifty times, so its share would be fifty times too large. For the
same reason the threshold is a minute there: what runs on the wall clock (a step judged
long, the loop thread's own schedstat reading every half threshold) would run fifty
times too often; the per-step test that decides it still runs at every step.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys

import anyio
import overhead  # bench/overhead.py: its app and timed bursts (bench/ is on sys.path)

from pytest_stallguard import audit
from pytest_stallguard.config import Settings
from pytest_stallguard.loopwatch import watchdog
from pytest_stallguard.run import GuardRun

PARTS = ("audit", "watchdog", "traps", "leak check")
CONFIGS = ("off", "on", *(f"on - {part}" for part in PARTS), "step hooks only")


def child(config: str, n: int, bursts: int, counted: bool = False) -> float:
    """The fastest of ``bursts`` timed bursts of ``n`` requests, in this process (the
    bursts of bench/overhead.py's fixture path); ``counted``: run under callgrind (the
    watchdog off, and a threshold no step reaches however much valgrind slows it)."""
    overhead.BURSTS = bursts
    if config == "off":
        return overhead.run_off(n)
    off = set(PARTS) if config == "step hooks only" else {config.removeprefix("on - ")}
    audit.enabled = "audit" not in off
    if "watchdog" in off or counted:
        watchdog.Watchdog.start = lambda self: None  # type: ignore[method-assign]
    settings = Settings(
        traps="off" if "traps" in off else "record",
        leak_check="leak check" not in off,
        **({"threshold_ms": 60_000.0} if counted else {}),
    )
    with GuardRun(settings) as run:

        async def main() -> float:
            await run.enter_loop()
            elapsed = await overhead.timed_burst(run.guard, n)
            await run.leave_loop()
            return elapsed

        return anyio.run(main, backend="asyncio")


def measure(config: str, n: int, bursts: int) -> float:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", config,
         "--requests", str(n), "--bursts", str(bursts)],
        capture_output=True, text=True, timeout=300,
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {config!r} failed (rc {out.returncode}): "
                           f"{out.stderr.strip()[-800:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


# callgrind's events, in the order of its "Collected :" line with --cache-sim=yes
EVENTS = ("Ir", "Dr", "Dw", "I1mr", "D1mr", "D1mw", "ILmr", "DLmr", "DLmw")
SMALL, LARGE = 200, 1200  # the two burst sizes of --count instructions


def count(config: str, n: int, cache: bool) -> dict[str, int]:
    """callgrind's totals for a child process of ``config`` with one burst of ``n``."""
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
           *(["--cache-sim=yes"] if cache else []),
           sys.executable, os.path.abspath(__file__), "--child", config,
           "--requests", str(n), "--bursts", "1", "--counted"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600,
                         env={**os.environ, "PYTHONHASHSEED": "0"})
    totals = [line.split("Collected :", 1)[1].split() for line in out.stderr.splitlines()
              if "Collected :" in line]
    if out.returncode != 0 or not totals:
        raise RuntimeError(f"callgrind child {config!r} failed (rc {out.returncode}): "
                           f"{out.stderr.strip()[-800:]}")
    return dict(zip(EVENTS, map(int, totals[-1]), strict=False))  # Ir only, or all nine


def count_all(cache: bool, jobs: int) -> None:
    if shutil.which("valgrind") is None:
        sys.exit("--count instructions needs valgrind (callgrind) on PATH; it is not: "
                 "install valgrind, or time the parts with the default --count wall")
    configs = [c for c in CONFIGS if c != "on - watchdog"]
    runs = [(c, n) for c in configs for n in (SMALL, LARGE)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        got = dict(zip(runs, pool.map(lambda run: count(run[0], run[1], cache), runs),
                       strict=True))
    per = {c: {e: (got[c, LARGE][e] - got[c, SMALL][e]) / (LARGE - SMALL)
               for e in got[c, LARGE]} for c in configs}
    base = per["off"]["Ir"]
    print(f"machine instructions per request (callgrind: a {LARGE}-request burst minus a "
          f"{SMALL}-request one, over {LARGE - SMALL}; the watchdog thread off throughout):")
    for c in configs:
        misses = ""
        if cache:
            l1 = sum(per[c][e] for e in ("I1mr", "D1mr", "D1mw"))
            misses = f"  L1 misses {l1:7,.0f}"
        print(f"  {c:<16} {per[c]['Ir']:9,.0f}  ({per[c]['Ir'] / base:.3f} x off){misses}")
    print("share of each part (on minus on without it):")
    for part in PARTS:
        if part == "watchdog":
            continue
        share = per["on"]["Ir"] - per[f"on - {part}"]["Ir"]
        print(f"  {part:<16} {share:+9,.0f} instructions/request "
              f"({share / base * 100:+.1f} points)")
    rest = per["step hooks only"]["Ir"] - base
    print(f"  {'step hooks':<16} {rest:+9,.0f} instructions/request ({rest / base * 100:+.1f} "
          "points; step hooks only minus off)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=13)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--count", choices=("wall", "instructions"), default="wall")
    parser.add_argument("--cache", action="store_true",
                        help="with --count instructions: also the simulated L1 cache misses")
    parser.add_argument("--jobs", type=int, default=2,
                        help="with --count instructions: callgrind children at a time")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--counted", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("rounds", "requests", "bursts", "jobs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: give a whole number of 1 or more")
    if args.child:
        print(json.dumps(child(args.child, args.requests, args.bursts,
                               counted=args.counted)))
        return
    if args.count == "instructions":
        count_all(args.cache, args.jobs)
        return
    times: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for r in range(args.rounds):
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
        for config in order:
            times[config].append(measure(config, args.requests, args.bursts))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    per_req = {c: statistics.median(v) / args.requests * 1e6 for c, v in times.items()}
    base = per_req["off"]
    print(f"median wall time per request over {args.rounds} rounds "
          f"({args.requests}-request bursts, fastest of {args.bursts} per child):")
    for config in CONFIGS:
        print(f"  {config:<16} {per_req[config]:7.1f} us  ({per_req[config] / base:.3f} x off)")
    print("share of each part (on minus on without it):")
    for part in PARTS:
        share = per_req["on"] - per_req[f"on - {part}"]
        print(f"  {part:<16} {share:+6.1f} us/request  ({share / base * 100:+.1f} points)")
    rest = per_req["step hooks only"] - base
    print(f"  {'step hooks':<16} {rest:+6.1f} us/request  ({rest / base * 100:+.1f} points; "
          "step hooks only minus off)")


if __name__ == "__main__":
    main()
