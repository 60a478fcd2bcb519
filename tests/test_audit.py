"""Where did the time go: per-request timings, the breakdown, and the reports drawn from it."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import struct
import subprocess
import sys
import time
import zlib
from html import escape
from pathlib import Path
from typing import Any

import anyio
import pytest
from fastapi import FastAPI

from pytest_stallguard import audit, burst, patching
from pytest_stallguard.client import running
from pytest_stallguard.config import Settings
from pytest_stallguard.driver import build_spec
from pytest_stallguard.model import BREAKDOWN_KEYS, BurstResult
from pytest_stallguard.run import GuardRun

from .conftest import BACKENDS, load_json

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


async def _bursts(app: FastAPI, plan: list[tuple[str, int]], threads: int | None = None,
                  concurrency: int | None = None) -> list[BurstResult]:
    """Bursts through the plugin's own machinery, guard armed (as stall_client does)."""
    settings = Settings(threshold_ms=10_000)  # the numbers are the point here, not findings
    out = []
    with GuardRun(settings) as run:
        await run.enter_loop()
        if threads is not None:
            run.shrink.threads(threads)
        async with running(app, settings, run.guard) as client:
            for path, n in plan:
                out.append(await client.burst("GET", path, n=n, concurrency=concurrency))
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


@pytest.mark.parametrize("anyio_backend", BACKENDS)
async def test_a_request_queued_behind_the_loop_waits_for_it(anyio_backend: Any) -> None:
    (hold,) = await _bursts(busy_app(), [("/hold", 5)])
    _adds_up(hold)
    last = max(hold.requests, key=lambda r: r.latency_ms)
    # It ran its own 30 ms, but waited while the four others ran theirs.
    assert last.breakdown is not None
    assert last.breakdown["loop_wait_ms"] > 2 * last.breakdown["loop_ms"]
    assert last.breakdown["loop_wait_ms"] > 0.6 * last.latency_ms
    total = hold.breakdown
    assert total is not None and total["loop_ms"] > total["other_ms"]


async def test_requests_one_after_another_in_a_task_each_get_their_own_steps() -> None:
    """``concurrency=1``: one task runs the requests in turn; a request ends inside the
    loop step the next one begins in (the app never yields), and each gets its part."""
    (hold,) = await _bursts(busy_app(), [("/hold", 4)], concurrency=1)
    _adds_up(hold)
    for r in hold.requests:
        assert r.breakdown is not None
        # Its own 30 ms of CPU on the loop (longer in wall time on a loaded machine), and
        # the bulk of its time: it ran in turn, with no other request to wait for.
        assert r.breakdown["loop_ms"] > 0.8 * 30, r.breakdown
        assert r.breakdown["loop_ms"] > 0.5 * r.latency_ms, (r.latency_ms, r.breakdown)


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


# -- the shop example: every burst adds up, and the stories show ------------------------------

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Added beside the example tests (same fixtures: the fixed and the broken shop).
STORIES = '''
"""Where the shop's time goes under load (read back by tests/test_audit.py)."""

import dataclasses
import time

import pytest
import sqlalchemy  # noqa: F401  (imported at collection: watched from the first test on)
from test_login import CREDENTIALS

# The numbers are the point here, not the verdict: no test fails on a finding (the broken
# shop's tests end in 1 / 0, its expected failure in conftest terms).
pytestmark = pytest.mark.concurrency(traps="off", stall_threshold_ms=60_000,
                                     pool_wait_ms=60_000, max_canary_slowdown=1e9,
                                     leak_check=False, allow=["shop.broken.*"])


@pytest.fixture
def shop_config(shop_config, slow_upstream):
    # A stats service slower than the examples' (500 ms, not 200): what the broken
    # dashboard holds a connection across, against a query however slow a busy box makes it.
    stats = slow_upstream.serve(delay=0.5, json={"visits": 42})
    return dataclasses.replace(shop_config, stats_url=stats.url)


@pytest.mark.broken_fails_with(raises=ZeroDivisionError)
async def test_story_dashboard(stall_client, stall_app, shrink_pools):
    # Two connections for twelve requests: the broken dashboard holds one across its
    # stats call, the fixed one gives it back after its query.
    shrink_pools.sqlalchemy(stall_app.state.db, size=2, overflow=0, timeout=30)
    result = await stall_client.burst("GET", "/dashboard", n=12, canary="/health")
    assert result.statuses[200] == 12
    if stall_app.title == "shop (broken)":
        1 / 0  # the broken shop's expected failure (see conftest), not a finding


@pytest.mark.broken_fails_with(raises=ZeroDivisionError)
async def test_story_login(stall_client, stall_app):
    result = await stall_client.burst("POST", "/login", n=10, json=CREDENTIALS,
                                      canary="/health")
    assert result.statuses[200] == 10
    if stall_app.title == "shop (broken)":
        1 / 0


@pytest.mark.broken_fails_with(raises=ZeroDivisionError)
async def test_story_report_threads(stall_client, stall_app, shrink_pools):
    def report() -> dict[str, bool]:  # a `def` endpoint: FastAPI runs it in a thread
        time.sleep(0.05)
        return {"ok": True}

    stall_app.add_api_route("/report", report)
    shrink_pools.threads(2)
    result = await stall_client.burst("GET", "/report", n=10)
    assert result.statuses[200] == 10
    if stall_app.title == "shop (broken)":
        1 / 0
'''


@pytest.fixture(scope="module")
def shop_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The examples (and the stories above) run once under xdist, with every report."""
    root = tmp_path_factory.mktemp("shop-examples")
    shutil.copytree(EXAMPLES, root / "examples", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "examples" / "test_stories.py").write_text(STORIES)
    (root / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
    )
    out = {"json": root / "r.json", "html": root / "r.html", "trace": root / "r.trace.json"}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:randomly", "-p", "no:cacheprovider", "-q",
         "-n", "2", "examples", "--stall-report",
         f"--stall-report-json={out['json']}", f"--stall-report-html={out['html']}",
         f"--stall-trace={out['trace']}"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out["json"].exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"stdout": proc.stdout, "json": load_json(out["json"]),
            "html": out["html"].read_text(), "trace": load_json(out["trace"]),
            "html_path": out["html"]}


def _bursts_of(report: dict[str, Any], name: str, variant: str) -> dict[str, Any]:
    for test in report["tests"]:
        if f"::{name}[{variant}-" in test["nodeid"]:
            (burst,) = test["bursts"]
            return burst  # type: ignore[no-any-return]
    raise AssertionError(f"{name}[{variant}] not in the report")


def _share(burst: dict[str, Any], key: str) -> float:
    total = burst["breakdown"]
    return float(total[key] / sum(total.values()))


def test_every_request_of_every_example_burst_adds_up(shop_run: dict[str, Any]) -> None:
    bursts = [b for t in shop_run["json"]["tests"] for b in t["bursts"]]
    assert len(bursts) >= 20  # both shops, every example with a burst, the stories
    for one in bursts:
        assert one["breakdown"] is not None
        for r in one["requests"]:
            parts = r["breakdown"]
            assert set(parts) == set(BREAKDOWN_KEYS) and min(parts.values()) >= 0
            assert abs(sum(parts.values()) - r["latency_ms"]) <= max(
                0.02 * r["latency_ms"], 0.01), (one["path"], r)


def test_the_broken_dashboard_waited_for_a_pool_slot(shop_run: dict[str, Any]) -> None:
    broken = _bursts_of(shop_run["json"], "test_story_dashboard", "broken")
    fixed = _bursts_of(shop_run["json"], "test_story_dashboard", "fixed")
    # Broken: most of the time went to waiting for one of the two connections, held by
    # others across their 500 ms stats call. Fixed: the connections are held only for the
    # query, so the queue for them is a fraction of that, and the stats call leads.
    numbers = {"broken": broken["breakdown"], "fixed": fixed["breakdown"]}
    assert _share(broken, "pool_wait_ms") > 0.5, numbers
    assert max(broken["breakdown"], key=broken["breakdown"].get) == "pool_wait_ms", numbers
    assert max(fixed["breakdown"], key=fixed["breakdown"].get) == "io_ms", numbers
    assert broken["breakdown"]["pool_wait_ms"] > 3 * fixed["breakdown"]["pool_wait_ms"], numbers
    # Those holders were awaiting the stats service with a connection in hand.
    in_use = broken["timeline"]["in_use"]["db connections in use"]
    assert max(level for _, level in in_use) == 2
    assert all(r["upstreams"] for r in broken["requests"])


def test_the_broken_login_waited_for_the_loop(shop_run: dict[str, Any]) -> None:
    broken = _bursts_of(shop_run["json"], "test_story_login", "broken")
    fixed = _bursts_of(shop_run["json"], "test_story_login", "fixed")
    assert max(broken["breakdown"], key=broken["breakdown"].get) == "loop_wait_ms"
    assert _share(broken, "loop_wait_ms") > 0.5
    assert _share(fixed, "loop_wait_ms") < _share(broken, "loop_wait_ms") / 3


def test_a_def_endpoint_on_two_threads_waited_for_threads(shop_run: dict[str, Any]) -> None:
    for variant in ("fixed", "broken"):
        burst = _bursts_of(shop_run["json"], "test_story_report_threads", variant)
        assert max(burst["breakdown"], key=burst["breakdown"].get) == "thread_wait_ms"
        assert burst["timeline"]["in_use"]["threads in use"]
        assert max(level for _, level in burst["timeline"]["in_use"]["threads in use"]) == 2


def test_the_terminal_report_names_the_pool_wait(shop_run: dict[str, Any]) -> None:
    lines = shop_run["stdout"].splitlines()
    at = next(i for i, line in enumerate(lines)
              if "test_story_dashboard[broken-" in line and line.endswith("]"))
    block = "\n".join(lines[at:at + 8])
    assert "    time went to: pool wait" in block


CANARY_HOLD_TEST = """
async def test_hold(stall_client):
    await stall_client.burst("GET", "/hold", n=5, canary="/health")
"""
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


def _html_report(shop: pytest.Pytester) -> Path:
    shop.makepyfile(test_hold=CANARY_HOLD_TEST)
    out = shop.path / "report.html"
    shop.runpytest("-p", "no:asyncio", f"--stall-report-html={out}").assert_outcomes(failed=1)
    return out


def test_html_report_draws_a_timeline_per_burst(shop: pytest.Pytester) -> None:
    html = _html_report(shop).read_text()
    # Self-contained: no script, nothing fetched.
    assert "<script" not in html and "https://" not in html and "http://" not in html
    assert html.count('<svg width=') == 1
    # Five request bars, each split into segments; the canary; the loop stalls marked.
    assert html.count('<g class="request">') == 5
    assert 'class="seg loop_wait_ms"' in html and 'class="seg loop_ms"' in html
    assert '<polyline class="canary"' in html
    assert html.count('class="mark loop-stall"') == 5
    assert "myapp.py:" in html  # the findings' locations
    assert "time went to: loop wait" in html


def _png_pixels(data: bytes) -> set[tuple[int, ...]]:
    """The distinct colours of an 8-bit RGB(A) PNG (what chromium writes), no Pillow."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        length = struct.unpack(">I", data[pos:pos + 4])[0]
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    previous = bytearray(stride)
    colours: set[tuple[int, ...]] = set()
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc
                                      else corner)) & 255
        previous = line
        colours.update(tuple(line[i:i + 3]) for i in range(0, stride, channels * 4))
    return colours


@pytest.mark.skipif(BROWSER is None, reason="no chromium here (Debian: apt-get install chromium)")
def test_html_report_renders_in_headless_chromium(shop: pytest.Pytester) -> None:
    page = _html_report(shop).as_uri()
    assert BROWSER is not None
    common = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run([*common, "--dump-dom", page], capture_output=True, text=True,
                         timeout=120).stdout
    # The browser parsed the SVG: its elements are in the DOM it built.
    assert dom.count("<svg") == 1 and dom.count('<g class="request">') == 5
    assert '<polyline class="canary"' in dom
    shot = shop.path / "shot.png"
    subprocess.run([*common, "--window-size=1100,900", f"--screenshot={shot}", page],
                   capture_output=True, timeout=120)
    colours = _png_pixels(shot.read_bytes())
    # Not blank: the bars were painted in the breakdown's colours.
    assert len(colours) > 10
    assert (0xd6, 0x27, 0x28) in colours  # loop
    assert (0xff, 0x98, 0x96) in colours  # loop wait


def test_the_trace_is_chrome_trace_events_merged_from_every_worker(
    shop_run: dict[str, Any],
) -> None:
    trace, report = shop_run["trace"], shop_run["json"]
    events = trace["traceEvents"]
    assert trace["displayTimeUnit"] == "ms"
    assert {e["ph"] for e in events} == {"M", "X", "C", "i"}
    bursts = [b for t in report["tests"] for b in t["bursts"] if b["requests"]]
    names = [e["args"]["name"] for e in events if e["name"] == "process_name"]
    assert len(names) == len(bursts)  # one process per burst, from both xdist workers
    tracks: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for e in events:
        assert isinstance(e["pid"], int) and isinstance(e["name"], str)
        if e["ph"] == "X":
            assert e["ts"] >= 0 and e["dur"] >= 0
            tracks.setdefault((e["pid"], e["tid"]), []).append(e)
    assert len(tracks) == sum(len(b["requests"]) for b in bursts)  # a track per request
    for xs in tracks.values():
        (whole,) = [e for e in xs if e["cat"] == "request"]
        parts = sorted((e for e in xs if e["cat"] != "request"), key=lambda e: e["ts"])
        assert parts and {e["cat"] for e in parts} <= set(BREAKDOWN_KEYS)
        end = whole["ts"] + whole["dur"]
        for before, after in itertools.pairwise(parts):
            assert before["ts"] + before["dur"] <= after["ts"] + 0.2  # no overlap: they nest
        assert parts[0]["ts"] >= whole["ts"] - 0.2 and parts[-1]["ts"] + parts[-1]["dur"] <= end + 0.2
    counters = {e["name"] for e in events if e["ph"] == "C"}
    assert {"loop lag (ms)", "threads in use", "db connections in use",
            "canary latency (ms)"} <= counters
    stalls = [e for e in events if e["ph"] == "i" and e["name"] == "loop-stall"]
    assert all("file:line" in e["args"] for e in events if e["ph"] == "i")
    # The broken login's hashing, where it stalled the loop.
    assert any(re.fullmatch(r"examples/shop/security\.py:\d+", e["args"]["file:line"])
               for e in stalls)


def test_the_html_report_is_merged_from_every_worker(shop_run: dict[str, Any]) -> None:
    html = shop_run["html"]
    for test in shop_run["json"]["tests"]:
        assert escape(test["nodeid"]) in html
    assert html.count("<svg width=") == sum(
        1 for t in shop_run["json"]["tests"] for b in t["bursts"] if b["requests"])


async def test_a_failing_audit_never_reaches_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(patching, "_warned", set())
    patching.take_warnings()

    class Broken(audit.Ledger):
        """A ledger whose step bookkeeping fails (read at the end of every step)."""

        __slots__ = ()

        @property  # type: ignore[override]
        def open(self) -> bool:
            raise RuntimeError("bookkeeping broken on purpose")

        @open.setter
        def open(self, value: bool) -> None:
            pass

    monkeypatch.setattr(audit, "Ledger", Broken)
    (hold,) = await _bursts(busy_app(), [("/hold", 3)])
    assert hold.statuses == {200: 3} and not hold.errors
    notes = patching.take_warnings()
    assert len(notes) == 1 and "request audit" in notes[0] and "bookkeeping broken" in notes[0]
    # The audit stopped at once: no loop step was counted for any request.
    assert all(r.breakdown is None for r in hold.requests)
