"""Where the guard's cost goes: the same 2,000-request burst with one part switched off.

Plain script, no pytest::

    python bench/overhead_split.py [--rounds 13] [--requests 2000] [--bursts 5]

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
"""

from __future__ import annotations

import argparse
import json
import os
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


def child(config: str, n: int, bursts: int) -> float:
    """The fastest of ``bursts`` timed bursts of ``n`` requests, in this process (the
    bursts of bench/overhead.py's fixture path)."""
    overhead.BURSTS = bursts
    if config == "off":
        return overhead.run_off(n)
    off = set(PARTS) if config == "step hooks only" else {config.removeprefix("on - ")}
    audit.enabled = "audit" not in off
    if "watchdog" in off:
        watchdog.Watchdog.start = lambda self: None  # type: ignore[method-assign]
    settings = Settings(
        traps="off" if "traps" in off else "record",
        leak_check="leak check" not in off,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=13)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--bursts", type=int, default=5)
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("rounds", "requests", "bursts"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)}: give a whole number of 1 or more")
    if args.child:
        print(json.dumps(child(args.child, args.requests, args.bursts)))
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
