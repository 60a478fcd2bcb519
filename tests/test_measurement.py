"""Unit tests of the burst and canary math, without the pytest plugin."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import anyio
import pytest
from fastapi import FastAPI

from pytest_stallguard import burst, canary
from pytest_stallguard.driver import build_spec, call
from pytest_stallguard.errors import ConfigError
from pytest_stallguard.model import BurstResult, CanaryResult, percentile


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/fast")
    async def fast() -> dict[str, bool]:
        return {"ok": True}


    @app.get("/block")
    async def block() -> dict[str, bool]:
        time.sleep(0.02)
        return {"ok": True}

    @app.get("/stream")
    async def stream():  # type: ignore[no-untyped-def]
        from fastapi.responses import StreamingResponse

        async def chunks():  # type: ignore[no-untyped-def]
            yield b"first"
            await anyio.sleep(0.3)
            yield b"last"

        return StreamingResponse(chunks())

    return app


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([], 95, 0.0),
        ([5.0], 50, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.0),
        (list(range(1, 101)), 95, 95),
        (list(range(1, 101)), 99, 99),
        ([3.0, 1.0, 2.0], 100, 3.0),
    ],
)
def test_percentile_is_nearest_rank(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == expected


def test_burst_result_fields() -> None:
    result = BurstResult("GET", "/x", 4, None, [1.0, 2.0, 3.0, 10.0], [0.5] * 4,
                         Counter({200: 3, 503: 1}), [], 0.01)
    assert (result.p50_ms, result.p95_ms, result.max_ms, result.ok) == (2.0, 10.0, 10.0, 3)
    data = result.to_dict()
    assert data["statuses"] == {"200": 3, "503": 1} and data["canary"] is None


def test_slowdown_is_floored() -> None:
    quiet = CanaryResult("/h", 10.0, (0.2, 0.3), (4.0,), floor_ms=2.0)
    noisy = CanaryResult("/h", 10.0, (5.0,), (20.0,), floor_ms=2.0)
    assert quiet.slowdown == 2.0  # 4 / max(0.3, 2)
    assert noisy.slowdown == 4.0  # 20 / 5


def test_floor_allows_for_queueing_behind_simultaneous_requests() -> None:
    assert canary.floor_for(1, 0.3) == canary.FLOOR_MS
    assert canary.floor_for(200, 0.3) == pytest.approx(60.0)


def test_latency_counts_from_issue_so_queueing_shows() -> None:
    """Ten requests that each block the loop 20 ms: the last waited for all the others."""

    async def main() -> BurstResult:
        app = make_app()
        spec = build_spec("GET", "/block")
        await call(app, spec)
        return await burst.run(app, [spec], 10)

    result = anyio.run(main)
    assert result.statuses[200] == 10
    # measured from the burst's start, the slowest request waited for the nine before it
    assert result.max_ms > 5 * min(result.latencies_ms)


def test_streaming_body_is_timed_not_buffered() -> None:
    async def main() -> BurstResult:
        app = make_app()
        return await burst.run(app, [build_spec("GET", "/stream")], 3)

    result = anyio.run(main)
    assert result.statuses[200] == 3
    for first, last in zip(result.ttfb_ms, result.latencies_ms, strict=True):
        # the second chunk comes at least 300 ms (a sleep is never early) after the first:
        # timed as streamed, the first byte is that much before the last; buffered, the two
        # would be one moment. (Not against the first byte's own time: a fresh app's first
        # request does its one-time work, over 100 ms on a loaded machine.)
        assert last - first >= 0.9 * 300


def test_request_timeout_counts_as_error() -> None:
    async def main() -> BurstResult:
        return await burst.run(make_app(), [build_spec("GET", "/stream")], 4, timeout=0.02)

    result = anyio.run(main)
    assert len(result.errors) == 4 and not result.statuses
    assert all(isinstance(e.exception, TimeoutError) for e in result.errors)


def test_canary_counts_from_schedule_through_a_blocked_loop() -> None:
    """A 500 ms block with probes every 5 ms: the canary must see it, not hide it (a
    starved machine's quiet baseline p95 can reach 25 ms: the block dwarfs it)."""

    async def main() -> tuple[CanaryResult, float]:
        app = make_app()
        spec = build_spec("GET", "/fast")
        quiet, service = await canary.baseline(app, spec, 5.0)
        assert 0 < service < max(quiet)
        out: list[CanaryResult] = []
        async with canary.probing(app, spec, 5.0, quiet, out):
            await anyio.sleep(0.03)
            started = time.perf_counter()
            time.sleep(0.5)
            blocked_ms = (time.perf_counter() - started) * 1000
            await anyio.sleep(0.03)
        return out[0], blocked_ms

    result, blocked_ms = anyio.run(main)
    assert result.max_ms >= 0.9 * blocked_ms
    # the probes the prober missed while blocked were fired, each from its schedule
    assert result.probes >= 0.8 * (blocked_ms / 5.0)
    assert result.p95_ms > 10 * result.baseline_p95_ms


@pytest.mark.parametrize(
    "bad",
    [[], [("GET",)], [42], [("GET", 5)], [{"method": "GET"}]],
)
def test_bad_request_specs_are_named(bad: list[object]) -> None:
    with pytest.raises(ConfigError, match="burst\\(\\)"):
        burst.parse_specs(bad)


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        (("GET",), {}, r"burst\('GET'\): the path is missing"),
        (([("GET", "/fast")], "/x"), {"json": {}}, r"got path, json beside a list of requests"),
    ],
)
def test_bad_burst_calls_say_what_to_write(
    args: tuple[object, ...], kwargs: dict[str, object], expected: str
) -> None:
    from pytest_stallguard.client import StallClient
    from pytest_stallguard.config import Settings

    async def main() -> None:
        async with StallClient(make_app(), Settings(), None) as client:
            await client.burst(*args, **kwargs)  # type: ignore[arg-type]

    with pytest.raises(TypeError, match=expected):
        anyio.run(main)


@pytest.mark.parametrize(("knob", "value"), [("delay", -1.0), ("jitter", -0.5), ("fail_rate", 2.0)])
def test_bad_upstream_knobs_name_the_value(knob: str, value: float) -> None:
    from pytest_stallguard.upstream import SlowUpstreams

    with SlowUpstreams() as fakes, pytest.raises(ValueError, match=f"{knob}={value!r} is not valid"):
        fakes("https://pay.example", **{knob: value})


@pytest.mark.anyio
async def test_request_timings_are_settled_on_first_read(
    anyio_backend: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Splitting each request's time into its breakdown waits until someone reads it (a
    burst nobody reads request by request does not pay for it), and gives then what the
    burst saw: once, as a list would, pickled as a list."""
    import pickle

    from pytest_stallguard import audit
    from pytest_stallguard.client import running
    from pytest_stallguard.config import Settings
    from pytest_stallguard.run import GuardRun

    settled: list[int] = []
    settle = audit.settle

    def counted(*args: Any) -> Any:
        settled.append(1)
        return settle(*args)

    monkeypatch.setattr(audit, "settle", counted)
    with GuardRun(Settings()) as run:
        await run.enter_loop()
        async with running(make_app(), Settings(), run.guard) as client:
            result = await client.burst("GET", "/fast", n=12)
        await run.leave_loop()
    assert settled == []  # nothing read yet
    assert [r.i for r in result.requests] == list(range(12))
    assert len(settled) == 12
    assert all(r.breakdown is not None for r in result.requests)
    assert result.breakdown is not None and result.breakdown["loop_ms"] > 0
    as_list = list(result.requests)
    assert result.requests == as_list and pickle.loads(pickle.dumps(result.requests)) == as_list
    assert result.to_dict()["requests"] == [r.to_dict() for r in as_list]
    assert len(settled) == 12  # settled once


@pytest.mark.anyio
async def test_the_timeline_counters_wait_for_the_first_read(
    anyio_backend: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The timeline's counters walk every step of every request: made on first read, once,
    from the burst's own steps; the findings it marks are those of the burst's time."""
    import json
    import pickle

    from pytest_stallguard import audit
    from pytest_stallguard.client import running
    from pytest_stallguard.config import Settings
    from pytest_stallguard.run import GuardRun

    made: list[int] = []
    counters = audit.Recorder.counters

    def counted(self: audit.Recorder, *args: Any) -> Any:
        made.append(1)
        return counters(self, *args)

    monkeypatch.setattr(audit.Recorder, "counters", counted)
    with GuardRun(Settings()) as run:
        await run.enter_loop()
        async with running(make_app(), Settings(), run.guard) as client:
            result = await client.burst("GET", "/fast", n=12)
            await client.get("/fast")  # more steps after the burst: not on its timeline
        await run.leave_loop()
    assert made == []  # nothing read yet
    assert set(result.timeline) == {"loop_lag_ms", "in_use", "marks"}
    assert made == [1]
    as_dict = dict(result.timeline)
    assert result.timeline == as_dict and pickle.loads(pickle.dumps(result.timeline)) == as_dict
    assert json.loads(json.dumps(result.to_dict()))["timeline"] == json.loads(json.dumps(as_dict))
    span_ms = result.elapsed_s * 1000.0
    assert all(0 <= t <= span_ms + 1 for t, _ in as_dict["loop_lag_ms"])
    assert made == [1]  # made once
