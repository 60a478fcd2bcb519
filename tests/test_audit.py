"""Where did the time go: per-request timings, the breakdown, and the reports drawn from it."""

from __future__ import annotations

import anyio
import pytest
from fastapi import FastAPI

from pytest_stallguard import burst
from pytest_stallguard.driver import build_spec

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
