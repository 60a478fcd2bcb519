"""The per-request audit's cost: a 2,000-request burst, guard on, audit on vs off.

Plain script, no pytest::

    python bench/audit.py [--rounds 7] [--requests 2000]

Same app and method as ``bench/overhead.py`` (fastest of ``--bursts`` timed bursts after
a warm-up, in a fresh loop per measurement, modes alternating and rotating per round):

* off: nothing armed;
* guard: ``GuardRun`` armed (traps, loop watch, pool watch), ``audit.enabled = False``;
* audit: the same with the audit on (the default).

Prints per-round times and the medians of the per-round ratios audit/guard (the audit's
own cost) and audit/off (everything the plugin adds, as bench/overhead.py measures).
"""

from __future__ import annotations

import argparse
import statistics

from overhead import run_off, run_on  # bench/ is on sys.path when run as a script

from pytest_stallguard import audit


def run_guard(n: int) -> float:
    audit.enabled = False
    try:
        return run_on(n)
    finally:
        audit.enabled = True


def run_audit(n: int) -> float:
    audit.enabled = True
    return run_on(n)


MODES = {"off": run_off, "guard": run_guard, "audit": run_audit}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    names = list(MODES)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(MODES[name](args.requests))
        print(f"round {r + 1}: " + ", ".join(f"{m} {times[m][-1] * 1000:.0f} ms" for m in names),
              flush=True)
    own = statistics.median(
        a / g for a, g in zip(times["audit"], times["guard"], strict=True))
    total = statistics.median(a / o for a, o in zip(times["audit"], times["off"], strict=True))
    guard = statistics.median(g / o for g, o in zip(times["guard"], times["off"], strict=True))
    print(f"median ratios over {args.rounds} rounds of {args.requests} requests: "
          f"audit/guard {own:.3f} (the audit's own cost), guard/off {guard:.3f}, "
          f"audit/off {total:.3f}")


if __name__ == "__main__":
    main()
