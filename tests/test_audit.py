"""Where did the time go: per-request timings, the breakdown, and the reports drawn from it."""

from __future__ import annotations

import time

import anyio
import pytest
from fastapi import FastAPI

from pytest_stallguard import audit, burst
from pytest_stallguard.client import running
from pytest_stallguard.config import Settings
from pytest_stallguard.driver import build_spec
from pytest_stallguard.model import BREAKDOWN_KEYS, BurstResult
from pytest_stallguard.run import GuardRun

from .conftest import load_json

pytestmark = pytest.mark.anyio


def small_app() -> FastAPI:
    app = FastAPI()

    @app.get("/fast")
    async def fast() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/nap")
    async def nap() -> dict[str, bool]:
        await anyio.sleep(0.02)
        return {"ok": True}

    @app.get("/missing-here")
    async def missing() -> dict[str, bool]:
        from fastapi import HTTPException

        raise HTTPException(status_code=404)

    return app


async def test_one_timing_per_request_in_issue_order() -> None:
    specs = burst.parse_specs([("GET", "/fast"), ("GET", "/nap"), ("GET", "/missing-here")])
    result = await burst.run(small_app(), specs, n=9, concurrency=3)

    assert [r.i for r in result.requests] == list(range(9))
    assert [r.path for r in result.requests] == ["/fast", "/nap", "/missing-here"] * 3
    assert [r.status for r in result.requests] == [200, 200, 404] * 3
    assert all(r.method == "GET" for r in result.requests)
    assert [r.latency_ms for r in result.requests] == result.latencies_ms
    assert all(0 < r.ttfb_ms <= r.latency_ms for r in result.requests)
    # Three at a time: the later requests were issued after the first ones ended.
    starts = [r.start_ms for r in result.requests]
    assert starts[:3] != starts[6:] and max(starts[6:]) > max(starts[:3])
    naps = [r for r in result.requests if r.path == "/nap"]
    assert all(r.start_ms + r.latency_ms <= result.elapsed_s * 1000.0 + 1.0 for r in naps)


async def test_all_at_once_requests_start_at_zero() -> None:
    result = await burst.run(small_app(), [build_spec("GET", "/fast")], n=5)
    assert [r.start_ms for r in result.requests] == [0.0] * 5
    data = result.to_dict()
    assert [r["i"] for r in data["requests"]] == list(range(5))
    assert set(data["requests"][0]) >= {
        "i", "method", "path", "status", "start_ms", "latency_ms", "ttfb_ms", "breakdown",
        "upstreams",
    }


def test_xdist_report_has_the_requests_of_every_worker(shop: pytest.Pytester) -> None:
    shop.makepyfile(
        **{
            f"test_w{i}": f"""
            async def test_burst_{i}(stall_client):
                r = await stall_client.burst("GET", "/health", n={i + 2})
                assert len(r.requests) == {i + 2}
            """
            for i in range(2)
        }
    )
    out = shop.path / "merged.json"
    result = shop.runpytest_subprocess("-p", "no:asyncio", "-n", "2", f"--stall-report-json={out}")
    result.assert_outcomes(passed=2)
    report = load_json(out)
    got = sorted(len(t["bursts"][0]["requests"]) for t in report["tests"])
    assert got == [2, 3]


# -- the breakdown ---------------------------------------------------------------------------


def busy_app() -> FastAPI:
    app = FastAPI()

    @app.get("/hold")
    async def hold() -> dict[str, bool]:
        # 30 ms of this thread's CPU on the loop: every other request waits for it.
        t = time.thread_time()
        while time.thread_time() - t < 0.03:
            pass
        return {"ok": True}

    @app.get("/sync")
    def sync() -> dict[str, bool]:  # FastAPI runs it in a worker thread
        time.sleep(0.05)
        return {"ok": True}

    @app.get("/nap")
    async def nap() -> dict[str, bool]:
        await anyio.sleep(0.05)
        return {"ok": True}

    return app


async def _bursts(app: FastAPI, plan: list[tuple[str, int]], threads: int | None = None
                  ) -> list[BurstResult]:
    """Bursts through the plugin's own machinery, guard armed (as stall_client does)."""
    settings = Settings(threshold_ms=10_000)  # the numbers are the point here, not findings
    out = []
    with GuardRun(settings) as run:
        await run.enter_loop()
        if threads is not None:
            run.shrink.threads(threads)
        async with running(app, settings, run.guard) as client:
            for path, n in plan:
                out.append(await client.burst("GET", path, n=n))
        await run.leave_loop()
    return out


def _adds_up(result: BurstResult) -> None:
    for r in result.requests:
        assert r.breakdown is not None and set(r.breakdown) == set(BREAKDOWN_KEYS)
        assert all(v >= 0 for v in r.breakdown.values()), r.breakdown
        assert sum(r.breakdown.values()) == pytest.approx(r.latency_ms, rel=0.02, abs=0.01)
        # Segments tile the request's time, from its issue to its last byte.
        assert r.segments[0][1] == pytest.approx(r.start_ms, abs=0.01)
        assert r.segments[-1][2] == pytest.approx(r.start_ms + r.latency_ms, abs=0.01)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_a_request_queued_behind_the_loop_waits_for_it(anyio_backend: str) -> None:
    (hold,) = await _bursts(busy_app(), [("/hold", 5)])
    _adds_up(hold)
    last = max(hold.requests, key=lambda r: r.latency_ms)
    # It ran its own 30 ms, but waited while the four others ran theirs.
    assert last.breakdown is not None
    assert last.breakdown["loop_wait_ms"] > 2 * last.breakdown["loop_ms"]
    assert last.breakdown["loop_wait_ms"] > 0.6 * last.latency_ms
    total = hold.breakdown
    assert total is not None and total["loop_ms"] > total["other_ms"]


async def test_a_def_endpoint_on_two_threads_waits_for_a_token() -> None:
    (sync,) = await _bursts(busy_app(), [("/sync", 8)], threads=2)
    _adds_up(sync)
    total = sync.breakdown
    assert total is not None
    # Two at a time: six of eight wait 1, 1, 2, 2, 3, 3 sleeps of 50 ms for a thread.
    assert total["thread_wait_ms"] > total["thread_ms"]
    assert total["thread_ms"] > 0.8 * 8 * 50
    assert total["loop_wait_ms"] < total["thread_wait_ms"] / 3


async def test_a_sleep_is_other_time_and_nothing_is_counted_without_a_guard() -> None:
    (nap,) = await _bursts(busy_app(), [("/nap", 5)])
    _adds_up(nap)
    assert nap.breakdown is not None
    assert nap.breakdown["other_ms"] > 0.8 * sum(nap.latencies_ms)
    # No guard armed: nothing times the loop's steps, so no breakdown (not a wrong one).
    async with running(busy_app(), Settings(), None) as client:
        bare = await client.burst("GET", "/nap", n=3)
    assert bare.breakdown is None and all(r.breakdown is None for r in bare.requests)


def test_overlapping_spans_go_to_the_highest_rank() -> None:
    # loop 0-1, thread 0.5-3, io 2-5, nothing 5-6: loop > thread > io, rest other.
    spans = [(audit.RANK["io"], 2.0, 5.0), (audit.RANK["loop"], 0.0, 1.0),
             (audit.RANK["thread"], 0.5, 3.0), (audit.RANK["loop_wait"], -3.0, 0.0)]
    totals, segments = audit.partition(spans, 0.0, 6.0)
    assert totals == [1.0, 0.0, 2.0, 0.0, 0.0, 2.0, 1.0]
    assert [(r, s, e) for r, s, e in segments] == [
        (0, 0.0, 1.0), (2, 1.0, 3.0), (5, 3.0, 5.0), (audit.OTHER, 5.0, 6.0)
    ]


# -- the reports -------------------------------------------------------------------------------

HOLD_TEST = """
async def test_hold(stall_client):
    await stall_client.burst("GET", "/hold", n=5)
"""


def test_terminal_report_says_where_the_time_went(shop: pytest.Pytester) -> None:
    shop.makepyfile(test_hold=HOLD_TEST)
    result = shop.runpytest("-p", "no:asyncio", "--stall-report")
    result.assert_outcomes(failed=1)  # five loop stalls
    result.stdout.fnmatch_lines([
        "  burst GET /hold n=5:*",
        "    time went to: loop wait *%, loop *% (of * ms in 5 requests)",
        "    slow #* GET /hold -> 200 in * ms: loop wait *, loop *; meanwhile loop-stall x* at "
        "myapp.py:* (hold)",
    ])
    # Short: three slowest requests, not five.
    assert len([line for line in result.outlines if line.startswith("    slow #")]) == 3
