"""Reproduce httpcore's warm-pool wedge for real, and check the leak detector against it.

Plain script, no pytest::

    python bench/wedge.py [--bursts 18] [--backend asyncio|trio|both] [--cold]

FINDINGS ("httpcore pool, real sockets"): after a burst mixing ReadTimeout and PoolTimeout
on a warm pool (2 idle keep-alive connections), httpcore sometimes keeps connections stuck
``CONNECTING`` that no request owns, and the pool can be wedged for good (every later
request gets PoolTimeout). Whether it happens depends on httpcore's version and on the
machine's timing, which is why the test suite puts a pool in that state on purpose
(tests/test_leaks.py, ``test_wedged_pool_is_reported``) and this reproduction lives here.

Each burst: a fresh client (pool of 2, read timeout 0.2 s, pool timeout 0.2 s) warmed with
2 requests, then 10 requests at once to a loopback upstream answering after 0.3 s; then
the leak check (``LeakCheck``, grace 0.5 s) and, at the same moment, the pool's own state
read from its connections' repr; then one more request with a 1 s pool timeout ("wedged
for good" if it gets PoolTimeout). Printed per burst: outcomes, stuck connections, what
the detector said, whether they agree; then the totals. Exits 0: a measurement, not a
gate (a disagreement is printed as DISAGREES and counted in the totals).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Any

import anyio
import httpx

from pytest_stallguard.leaks import LeakCheck
from pytest_stallguard.pools import PoolWatch
from pytest_stallguard.upstream import serve

UPSTREAM_DELAY_S = 0.3
READ_TIMEOUT_S = 0.2
POOL_TIMEOUT_S = 0.2
BURST = 10


@dataclass
class Burst:
    outcomes: Counter[str]
    stuck: list[str]  # the pool's own view: connections CONNECTING or ACTIVE, no request
    reported: int  # connection-leak findings the detector made
    wedged_for_good: bool


def stuck_by_repr(pool: Any) -> list[str]:
    """The bench's own oracle, independent of the detector: read the connections' repr."""
    return [r for r in map(repr, pool.connections) if "CONNECTING" in r or "ACTIVE" in r]


async def one_burst(url: str, warm: bool) -> Burst:
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2)
    timeout = httpx.Timeout(5.0, read=READ_TIMEOUT_S, pool=POOL_TIMEOUT_S)
    outcomes: Counter[str] = Counter()

    async def one() -> None:
        try:
            await client.get(url)
            outcomes["ok"] += 1
        except httpx.TimeoutException as exc:
            outcomes[type(exc).__name__] += 1

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        with PoolWatch() as watch:
            leaks = LeakCheck(watch).start()
            if warm:  # two idle keep-alive connections
                async with anyio.create_task_group() as tg:
                    for _ in range(2):
                        tg.start_soon(lambda: client.get(url, timeout=5.0))
            async with anyio.create_task_group() as tg:
                for _ in range(BURST):
                    tg.start_soon(one)
            found = await leaks.check(grace_s=0.5)
            pool = client._transport._pool
            stuck = stuck_by_repr(pool)  # the same moment: nothing awaited since the check
        try:
            await client.get(url, timeout=httpx.Timeout(5.0, pool=1.0))
            wedged_for_good = False
        except httpx.PoolTimeout:
            wedged_for_good = True
    reported = sum(f.kind == "connection-leak" for f in found)
    return Burst(outcomes, stuck, reported, wedged_for_good)


async def run(backend: str, bursts: int, warm: bool) -> tuple[int, int, int]:
    wedged = for_good = disagreed = 0
    with serve(delay=UPSTREAM_DELAY_S) as server:
        for i in range(1, bursts + 1):
            b = await one_burst(server.url, warm)
            agree = bool(b.reported) == bool(b.stuck)
            wedged += bool(b.stuck)
            for_good += b.wedged_for_good
            disagreed += not agree
            outcomes = ", ".join(f"{k} {v}" for k, v in sorted(b.outcomes.items()))
            print(
                f"  {backend} burst {i:2d}: {outcomes:<38} stuck {len(b.stuck)}"
                f"{' (wedged for good)' if b.wedged_for_good else '':<18} "
                f"detector: {'reported' if b.reported else 'clean':<8} "
                f"{'agrees' if agree else 'DISAGREES: ' + '; '.join(b.stuck)}",
                flush=True,
            )
    return wedged, for_good, disagreed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", type=int, default=18, help="bursts per backend")
    parser.add_argument("--backend", choices=("asyncio", "trio", "both"), default="both")
    parser.add_argument("--cold", action="store_true", help="no warm-up (FINDINGS: 0 of 24)")
    args = parser.parse_args()
    if args.bursts < 1:
        parser.error(f"--bursts {args.bursts}: give 1 or more")
    backends = ["asyncio", "trio"] if args.backend == "both" else [args.backend]
    print(
        f"python {sys.version.split()[0]}, httpx {httpx.__version__}, "
        f"httpcore {__import__('httpcore').__version__}; {'cold' if args.cold else 'warm'} "
        f"pool of 2, burst of {BURST}, upstream {UPSTREAM_DELAY_S} s, read timeout "
        f"{READ_TIMEOUT_S} s, pool timeout {POOL_TIMEOUT_S} s"
    )
    for backend in backends:
        wedged, for_good, disagreed = anyio.run(
            run, backend, args.bursts, not args.cold, backend=backend
        )
        print(
            f"{backend}: pool left with stuck connections in {wedged} of {args.bursts} "
            f"bursts, wedged for good in {for_good}; detector agreed with the pool in "
            f"{args.bursts - disagreed} of {args.bursts}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
