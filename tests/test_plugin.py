"""The plugin as users meet it: pytester runs of small suites against a FastAPI app."""

from __future__ import annotations

import pytest

from pytest_stallguard.client import slowdown_message
from pytest_stallguard.config import DEFAULT_MAX_CANARY_SLOWDOWN, MARKER_KEYS, TRAP_MODES
from pytest_stallguard.report.data import SCHEMA

from .conftest import load_json


def test_header_shows_effective_settings(shop: pytest.Pytester) -> None:
    shop.makepyfile("def test_nothing(): pass")
    result = shop.runpytest("-p", "no:asyncio", "--stall-threshold-ms=15", "--stall-traps=raise")
    result.stdout.fnmatch_lines(["stallguard: threshold=15ms pool_wait=100ms traps=raise *"])
    result.assert_outcomes(passed=1)


def test_client_runs_lifespan_and_turns_crashes_into_500(shop: pytest.Pytester) -> None:
    shop.makepyfile(
        """
        async def test_it(stall_client):
            r = await stall_client.get("/state")
            assert r.json() == {"greeting": "hello", "started": True}
            r = await stall_client.get("/boom")
            assert r.status_code == 500
            r = await stall_client.post("/echo", json={"a": 1})
            assert r.json() == {"a": 1}
        """
    )
    shop.runpytest("-p", "no:asyncio").assert_outcomes(passed=1)


def test_burst_counts_statuses_and_orders_latencies(shop: pytest.Pytester) -> None:
    shop.makepyfile(
        """
        async def test_it(stall_client):
            r = await stall_client.burst("GET", "/slow", n=30)
            assert r.statuses[200] == 30 and r.n == 30 and not r.errors
            assert len(r.latencies_ms) == 30
            assert r.p50_ms <= r.p95_ms <= r.p99_ms <= r.max_ms
            # all 30 wait concurrently: the burst takes about one request's time, not 30
            assert r.elapsed_s * 1000 < 5 * r.p50_ms

            capped = await stall_client.burst("GET", "/slow", n=6, concurrency=2)
            # two at a time: three waves
            assert capped.elapsed_s > 2.5 * (r.elapsed_s / 1.2)

            mixed = await stall_client.burst([("GET", "/health"), ("POST", "/echo", {"json": {}})], n=10)
            assert mixed.statuses[200] == 10 and mixed.method == "MIXED"

            crashed = await stall_client.burst("GET", "/boom", n=5)
            assert crashed.statuses[500] == 5
        """
    )
    shop.runpytest("-p", "no:asyncio").assert_outcomes(passed=1)


def test_canary_slowdown_fails_with_an_actionable_message(shop: pytest.Pytester) -> None:
    shop.makepyfile(
        """
        import pytest

        @pytest.mark.concurrency(canary="/health")
        async def test_hold(stall_client):
            await stall_client.burst("GET", "/hold", n=20)

        @pytest.mark.concurrency(canary="/health")
        async def test_slow_but_async(stall_client):
            await stall_client.burst("GET", "/slow", n=50)
        """
    )
    result = shop.runpytest("-p", "no:asyncio")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*[[]canary-slowdown[]] The canary GET /health slowed down *x during a burst of "
            "20 x GET /hold: p95 * ms (max * ms, * probes) against a quiet baseline p95 of * ms*"
            f"the limit is {DEFAULT_MAX_CANARY_SLOWDOWN:g}x*",
        ]
    )
    assert "test_hold" in result.stdout.str().split("short test summary")[1]


def test_canary_context_manager(shop: pytest.Pytester) -> None:
    shop.makepyfile(
        """
        import anyio, time

        async def test_quiet(stall_client):
            async with stall_client.canary("/health", every_ms=5) as c:
                await anyio.sleep(0.1)
            assert c.result.probes >= 5
            assert c.slowdown < 10

        async def test_blocked(stall_client):
            async with stall_client.canary("/health", every_ms=5) as c:
                await anyio.sleep(0.02)
                # the test's own block, seen by the canary from schedule; long enough to
                # dwarf a quiet baseline on a starved machine (p95 up to ~30 ms seen)
                time.sleep(1.0)
                await anyio.sleep(0.02)
            assert c.max_ms > 800
        """
    )
    result = shop.runpytest("-p", "no:asyncio")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*canary-slowdown*the canary block*"])


def test_json_report_follows_the_schema(shop: pytest.Pytester) -> None:
    shop.makepyfile(
        """
        import pytest

        def test_plain():
            pass

        @pytest.mark.concurrency(canary="/health", n=10)
        async def test_burst(stall_client):
            await stall_client.burst("GET", "/slow")

        async def test_fails(stall_client):
            await stall_client.burst("GET", "/hold", n=10, canary="/health")
        """
    )
    out = shop.path / "out" / "report.json"
    result = shop.runpytest("-p", "no:asyncio", f"--stall-report-json={out}")
    result.assert_outcomes(passed=2, failed=1)
    report = load_json(out)
    assert report["schema"] == SCHEMA
    tests = {t["nodeid"].split("::")[1]: t for t in report["tests"]}
    assert set(tests) == {"test_burst[asyncio]", "test_fails[asyncio]"}
    burst = tests["test_burst[asyncio]"]
    assert burst["outcome"] == "passed" and burst["findings"] == []
    (b,) = burst["bursts"]
    assert {"method", "path", "n", "concurrency", "p50_ms", "p95_ms", "p99_ms", "max_ms",
            "statuses", "errors", "canary"} <= set(b)
    assert b["n"] == 10 and b["statuses"] == {"200": 10} and b["errors"] == 0
    assert set(b["canary"]) >= {"path", "baseline_p95_ms", "p95_ms", "max_ms", "slowdown"}
    failed = tests["test_fails[asyncio]"]
    assert failed["outcome"] == "failed"
    kinds = {f["kind"]: f for f in failed["findings"]}
    assert set(kinds) == {"canary-slowdown", "loop-stall"}
    for finding in failed["findings"]:
        assert set(finding) == {"kind", "message", "file", "line", "function", "request",
                                "duration_ms", "call", "count"}
    canary = kinds["canary-slowdown"]
    assert canary["file"] == "test_json_report_follows_the_schema.py"
    assert canary["function"] == "test_fails" and canary["request"] == "GET /health"
    stall = kinds["loop-stall"]
    assert (stall["file"], stall["function"], stall["request"]) == ("myapp.py", "hold", "GET /hold")
    assert report["summary"] == {"tests": 2, "findings": {"canary-slowdown": 1, "loop-stall": 1}}


def test_terminal_report(shop: pytest.Pytester) -> None:
    shop.makepyfile(
        """
        async def test_burst(stall_client):
            await stall_client.burst("GET", "/slow", n=12, canary="/health")
        """
    )
    result = shop.runpytest("-p", "no:asyncio", "--stall-report")
    result.stdout.fnmatch_lines(
        [
            "*stallguard report*",
            "*test_burst* [[]passed[]]",
            "  burst GET /slow n=12: p50 * ms, p95 * ms, p99 * ms, max * ms; statuses 200x12; errors 0",
            "    canary GET /health: baseline p95 * ms, during p95 * ms, max * ms, slowdown *x",
        ]
    )


def test_marker_selects_and_validates(shop: pytest.Pytester) -> None:
    shop.makepyfile(
        """
        import pytest

        @pytest.mark.concurrency(n=5)
        async def test_marked(stall_client):
            r = await stall_client.burst("GET", "/health")
            assert r.n == 5

        @pytest.mark.concurrency(bogus=1)
        async def test_bad_key(stall_client):
            pass

        @pytest.mark.concurrency(traps="loud")
        async def test_bad_value(stall_client):
            pass

        def test_unmarked():
            pass
        """
    )
    result = shop.runpytest("-p", "no:asyncio", "-m", "concurrency")
    result.assert_outcomes(passed=1, errors=2, deselected=1)
    result.stdout.fnmatch_lines(
        [
            "*unknown keyword(s) bogus*Valid keywords: " + ", ".join(sorted(MARKER_KEYS)) + "*",
            "*'loud' is not a valid traps mode (@pytest.mark.concurrency on *test_bad_value*). "
            "Valid values: " + ", ".join(TRAP_MODES) + "*",
        ]
    )


@pytest.mark.parametrize(
    ("args", "ini", "expected"),
    [
        (["--stall-traps=loud"], "", "*'loud' is not a valid traps mode (command line)*"),
        (["--stall-threshold-ms=abc"], "", "*stall_threshold_ms='abc' (command line) is not valid*"),
        ([], "stallguard_threshold_ms = -3", "*stall_threshold_ms='-3' (ini file) is not valid*"),
        ([], "stallguard_lifespan = maybe", "*'maybe' is not a valid lifespan mode (ini file)*"),
    ],
)
def test_bad_settings_are_usage_errors(
    pytester: pytest.Pytester, args: list[str], ini: str, expected: str
) -> None:
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("-p", "no:asyncio", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([expected])


@pytest.mark.parametrize(
    ("ini", "expected"),
    [
        ("", "*stallguard has no app to test: set stallguard_app*or define a fixture named stall_app*"),
        ("stallguard_app = nosuchmodule:app", "*could not import module 'nosuchmodule'*"),
        ("stallguard_app = myapp:nothing", "*module 'myapp' has no attribute 'nothing'*"),
        ("stallguard_app = myapp", "*'myapp' is not an import string*"),
        ("stallguard_app = myapp:create_app", "*which is not an ASGI app*"),
        ("stallguard_app = myapp:time", "*which is not an ASGI app*"),
    ],
)
def test_app_errors_name_what_was_tried(pytester: pytest.Pytester, ini: str, expected: str) -> None:
    from .conftest import APP

    pytester.makepyfile(myapp=APP)
    pytester.syspathinsert()
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(
        """
        async def test_it(stall_client):
            pass
        """
    )
    result = pytester.runpytest("-p", "no:asyncio")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([expected])
    assert "importlib" not in result.stdout.str()


def test_stall_app_fixture_wins_over_ini(shop: pytest.Pytester) -> None:
    shop.makeconftest(
        """
        import pytest
        from fastapi import FastAPI

        @pytest.fixture
        def stall_app():
            app = FastAPI()

            @app.get("/who")
            async def who():
                return {"app": "fixture"}

            return app
        """
    )
    shop.makepyfile(
        """
        async def test_it(stall_client):
            assert (await stall_client.get("/who")).json() == {"app": "fixture"}
        """
    )
    shop.runpytest("-p", "no:asyncio").assert_outcomes(passed=1)


def test_startup_timeout_is_reported(shop: pytest.Pytester) -> None:
    shop.makeconftest(
        """
        import anyio, pytest
        from contextlib import asynccontextmanager
        from fastapi import FastAPI

        @asynccontextmanager
        async def lifespan(app):
            await anyio.sleep(30)
            yield

        @pytest.fixture
        def stall_app():
            return FastAPI(lifespan=lifespan)
        """
    )
    shop.makepyfile(
        """
        import pytest

        @pytest.mark.concurrency(startup_timeout=0.2)
        async def test_it(stall_client):
            pass
        """
    )
    result = shop.runpytest("-p", "no:asyncio")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*lifespan startup did not finish within 0.2 s*"])


@pytest.mark.parametrize("mode", ["auto", "strict"])
def test_beside_pytest_asyncio(shop: pytest.Pytester, mode: str) -> None:
    shop.makepyfile(
        """
        import pytest

        async def test_ours(stall_client):
            r = await stall_client.burst("GET", "/health", n=5)
            assert r.statuses[200] == 5

        @pytest.mark.asyncio
        async def test_theirs():
            pass

        @pytest.mark.asyncio
        async def test_theirs_with_ours(stall_client):
            r = await stall_client.burst("GET", "/health", n=5)
            assert r.statuses[200] == 5

        async def test_after_theirs(stall_client):   # back on anyio in strict mode
            assert (await stall_client.get("/health")).status_code == 200
        """
    )
    result = shop.runpytest(
        "-p", "asyncio", f"--asyncio-mode={mode}", "-o", "asyncio_default_fixture_loop_scope=function",
        "-W", "error::pytest.PytestDeprecationWarning",
    )
    result.assert_outcomes(passed=4)


def test_slowdown_message_names_what_matters() -> None:
    from pytest_stallguard.model import CanaryResult

    result = CanaryResult("/health", 10.0, (1.0, 1.5), (80.0, 90.0, 100.0), 2.0)
    text = slowdown_message(result, 10.0, "a burst of 50 x POST /login")
    for part in ("GET /health", "50.0x", "p95 100.0 ms", "baseline p95 of 1.50 ms",
                 "floored to 2.0 ms", "limit is 10x", "POST /login"):
        assert part in text, part


def test_html_report_is_one_offline_file(shop: pytest.Pytester) -> None:
    shop.makepyfile(
        """
        async def test_burst(stall_client):
            await stall_client.burst("GET", "/hold", n=5, canary="/health")
        """
    )
    out = shop.path / "report.html"
    shop.runpytest("-p", "no:asyncio", f"--stall-report-html={out}").assert_outcomes(failed=1)
    html = out.read_text()
    assert "test_burst[asyncio]" in html and "canary-slowdown" in html
    assert "http://" not in html.replace("http://testserver", "") and "<script src" not in html


def test_xdist_workers_merge_into_one_report(shop: pytest.Pytester) -> None:
    shop.makepyfile(
        **{
            f"test_w{i}": f"""
            async def test_burst_{i}(stall_client):
                r = await stall_client.burst("GET", "/health", n={i + 2})
                assert r.n == {i + 2}
            """
            for i in range(4)
        }
    )
    out = shop.path / "merged.json"
    result = shop.runpytest_subprocess("-p", "no:asyncio", "-n", "2", f"--stall-report-json={out}")
    result.assert_outcomes(passed=4)
    report = load_json(out)
    assert sorted(t["bursts"][0]["n"] for t in report["tests"]) == [2, 3, 4, 5]
    assert report["summary"]["tests"] == 4
