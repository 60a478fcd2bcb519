"""pytest wiring: options, ini keys, the marker, fixtures, reports. Nothing else lives here."""

from __future__ import annotations

import functools
import inspect
import json
import traceback
import warnings
from collections.abc import AsyncIterator, Callable, Generator
from pathlib import Path
from typing import Any, Literal, cast

import pytest

from . import intercept, location, loopwatch, patching, waits
from .app import load_app
from .client import StallClient, running
from .config import MARKER_KEYS, Settings, layer, marker_values
from .errors import AppLoadError, ConfigError, StallFindings
from .guard import Guard
from .model import TestRecord
from .pools import ShrinkPools
from .report import data as data_report
from .report import text as text_report
from .run import GuardRun
from .upstream import SlowUpstreams

THRESHOLD_DESC = "Loop-stall threshold in milliseconds (default 20)."
POOL_WAIT_DESC = "Pool and worker-thread wait that makes a finding, in milliseconds (default 100)."
TRAPS_DESC = "What a trapped blocking call does: record (default, fail at teardown), raise, off."
ALL_DESC = "Arm the guard in every test, also ones that use no stallguard fixture."
REPORT_DESC = "Print the stallguard summary (bursts, canary, findings, pools) after the run."
ALLOW_DESC = "Lines of 'module.function' or 'path/to/file.py:function' where blocking is allowed."
APP_DESC = "The ASGI app under test: 'pkg.module:app' or 'pkg.module:create_app()'."
LIFESPAN_DESC = "Blocking in the app's lifespan: report (default, does not fail) or fail."
SLOWDOWN_DESC = "Canary p95 over quiet baseline p95 that fails a test (default 20)."
STARTUP_DESC = "Seconds the app's lifespan startup may take (default 30)."
SHUTDOWN_DESC = "Seconds the app's lifespan shutdown may take (default 30)."

class StallguardWarning(pytest.PytestWarning):
    """Something the plugin could not watch (a library version it cannot hook, say)."""


OUR_FIXTURES = frozenset({"stall_client", "stall_guard", "slow_upstream", "shrink_pools"})
ASYNC_FIXTURES = ("stall_client",)

SETTINGS_KEY = pytest.StashKey[Settings]()
ALL_KEY = pytest.StashKey[bool]()
RUN_KEY = pytest.StashKey[GuardRun]()
OUTCOME_KEY = pytest.StashKey[str]()
ROOT_KEY = pytest.StashKey[str]()
REPORTER_KEY = pytest.StashKey["_Reporter"]()

_sessions = 0  # configured sessions in this process (pytester runs nest inside ours)


# -- options -----------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("stallguard", "find what stalls async apps under load")
    group.addoption("--stall-guard", action="store_true", default=None, help=ALL_DESC)
    group.addoption("--stall-report", action="store_true", default=None, help=REPORT_DESC)
    group.addoption(
        "--stall-report-json", metavar="PATH", default=None,
        help="Write the machine-readable report (schema stallguard-report/1) to PATH.",
    )
    group.addoption(
        "--stall-report-html", metavar="PATH", default=None,
        help="Write a self-contained HTML report to PATH.",
    )
    group.addoption("--stall-threshold-ms", metavar="N", default=None, help=THRESHOLD_DESC)
    group.addoption(
        "--stall-traps", metavar="MODE", default=None, help=TRAPS_DESC,
    )
    parser.addini("stallguard_app", APP_DESC, default="")
    parser.addini("stallguard_all", ALL_DESC, type="bool", default=False)
    parser.addini("stallguard_report", REPORT_DESC, type="bool", default=False)
    parser.addini("stallguard_threshold_ms", THRESHOLD_DESC, default="")
    parser.addini("stallguard_traps", TRAPS_DESC, default="")
    parser.addini("stallguard_pool_wait_ms", POOL_WAIT_DESC, default="")
    parser.addini("stallguard_allow", ALLOW_DESC, type="linelist", default=[])
    parser.addini("stallguard_lifespan", LIFESPAN_DESC, default="")
    parser.addini("stallguard_max_canary_slowdown", SLOWDOWN_DESC, default="")
    parser.addini("stallguard_startup_timeout", STARTUP_DESC, default="")
    parser.addini("stallguard_shutdown_timeout", SHUTDOWN_DESC, default="")


def _base_settings(config: pytest.Config) -> Settings:
    """Built-in defaults < ini < command line."""
    ini = {
        "threshold_ms": config.getini("stallguard_threshold_ms") or None,
        "pool_wait_ms": config.getini("stallguard_pool_wait_ms") or None,
        "traps": config.getini("stallguard_traps") or None,
        "allow": config.getini("stallguard_allow") or None,
        "lifespan": config.getini("stallguard_lifespan") or None,
        "max_canary_slowdown": config.getini("stallguard_max_canary_slowdown") or None,
        "startup_timeout": config.getini("stallguard_startup_timeout") or None,
        "shutdown_timeout": config.getini("stallguard_shutdown_timeout") or None,
    }
    settings = layer(Settings(), ini, "ini file")
    cli = {
        "threshold_ms": config.getoption("--stall-threshold-ms"),
        "traps": config.getoption("--stall-traps"),
    }
    return layer(settings, cli, "command line")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "concurrency(**options): a stallguard concurrency test; options: "
        + ", ".join(sorted(MARKER_KEYS)),
    )
    try:
        config.stash[SETTINGS_KEY] = _base_settings(config)
    except ConfigError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[ALL_KEY] = bool(
        config.getoption("--stall-guard") or config.getini("stallguard_all")
    )
    global _sessions
    _sessions += 1
    reporter = _Reporter(config)
    config.stash[REPORTER_KEY] = reporter
    config.pluginmanager.register(reporter, "stallguard-reporter")
    config.stash[ROOT_KEY] = location.set_root(str(config.rootpath))
    if config.stash[ALL_KEY]:
        # Transports and lifespan managers built by module- or session-scoped fixtures
        # must carry request labels too: wrap their constructors for the whole session.
        intercept.install()


def pytest_unconfigure(config: pytest.Config) -> None:
    global _sessions
    intercept.uninstall()
    _sessions = max(0, _sessions - 1)
    if _sessions == 0:
        # The last line of defence (an interrupted run, a hook that never got to its
        # teardown): nothing of ours stays patched once pytest is done.
        loopwatch.stop_all()
        patching.restore_all()
        waits.stop()
    waits.stop_if_idle()
    old_root = config.stash.get(ROOT_KEY, None)
    if old_root is not None:  # a nested run (pytester) gives the outer one its root back
        location.set_root(old_root)


def pytest_report_header(config: pytest.Config) -> str:
    settings = config.stash[SETTINGS_KEY]
    mode = " guard=all" if config.stash[ALL_KEY] else ""
    return settings.header() + mode


# -- collection: async tests of ours run on anyio unless pytest-asyncio has them ----------


def _user_backend(collector: pytest.Collector) -> bool:
    """Whether the user chose a backend: their own anyio_backend fixture is visible."""
    manager = collector.session._fixturemanager
    defs = manager.getfixturedefs("anyio_backend", collector) or ()
    return bool(defs) and defs[-1].func.__module__ != "anyio.pytest_plugin"


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """Our async tests run on anyio with no marker of the user's, on asyncio by default.

    anyio alone would run them on every installed backend (trio too); an ASGI app under
    test usually runs on asyncio in production, so that is the default. A module or conftest
    that defines its own ``anyio_backend`` fixture chooses for itself.
    """
    if not isinstance(collector, (pytest.Module, pytest.Class)):
        return
    if not inspect.iscoroutinefunction(obj):
        return
    if not collector.istestfunction(obj, name):
        return
    marks = [m.name for m in getattr(obj, "pytestmark", ())]
    params = set(inspect.signature(obj).parameters)
    closest = collector.get_closest_marker
    ours = "concurrency" in marks or closest("concurrency") is not None or OUR_FIXTURES & params
    if not ours or "anyio" in marks or closest("anyio") is not None:
        return
    if "asyncio" in marks or closest("asyncio") is not None or _asyncio_auto(collector.config):
        return
    pytest.mark.anyio(obj)
    pytest.mark.usefixtures("anyio_backend")(obj)
    if "anyio_backend" not in params and not _user_backend(collector):
        pytest.mark.parametrize("anyio_backend", ["asyncio"])(obj)


def _asyncio_auto(config: pytest.Config) -> bool:
    if not config.pluginmanager.has_plugin("asyncio"):
        return False
    mode = config.getoption("asyncio_mode", None) or config.getini("asyncio_mode")
    return str(mode) == "auto"


def _is_ours(item: pytest.Item) -> bool:
    names = getattr(item, "fixturenames", ())
    return item.get_closest_marker("concurrency") is not None or bool(OUR_FIXTURES & set(names))


# -- per-test lifecycle -------------------------------------------------------------------


def _settings_for(item: pytest.Item) -> Settings:
    settings = item.config.stash[SETTINGS_KEY]
    for mark in reversed(list(item.iter_markers("concurrency"))):  # closest applied last
        where = f"@pytest.mark.concurrency on {item.nodeid}"
        settings = layer(settings, marker_values(mark.args, mark.kwargs, where), where)
    return settings


def _lend_fixtures_to_asyncio(item: pytest.Item, lend: bool) -> None:
    """Let pytest-asyncio run our async fixtures for a test it runs itself.

    In strict mode pytest-asyncio only runs fixtures it was told about; a test marked
    ``@pytest.mark.asyncio`` that asks for ``stall_client`` needs the fixture on the same
    loop as the test. The flag is set for this test only (anyio runs the others).
    """
    if item.get_closest_marker("asyncio") is None:
        return
    info = getattr(item, "_fixtureinfo", None)
    for name in ASYNC_FIXTURES:
        for fixturedef in info.name2fixturedefs.get(name, ()) if info else ():
            if lend:
                fixturedef.func._force_asyncio_fixture = True
            else:
                fixturedef.func.__dict__.pop("_force_asyncio_fixture", None)


SYNC_CLIENT_MESSAGE = (
    "{test} requests stall_client, which serves the app on an event loop: make the test "
    "`async def {name}(stall_client): ...` (it runs on anyio, no marker needed). A sync "
    "test can use Starlette's TestClient instead; --stall-guard watches it."
)


def _check_sync_client(item: pytest.Item) -> None:
    if not isinstance(item, pytest.Function) or "stall_client" not in item.fixturenames:
        return
    if not inspect.iscoroutinefunction(item.obj):
        test = item.nodeid
        pytest.fail(SYNC_CLIENT_MESSAGE.format(test=test, name=item.originalname), pytrace=False)


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    _lend_fixtures_to_asyncio(item, True)
    _check_sync_client(item)
    if _is_ours(item) or item.config.stash[ALL_KEY]:
        try:
            settings = _settings_for(item)
        except ConfigError as exc:
            pytest.fail(str(exc), pytrace=False)
        if item.config.stash[ALL_KEY]:
            intercept.install()  # again after a restore_all(); idempotent otherwise
        run = GuardRun(settings)
        item.stash[RUN_KEY] = run
        run.start()
        run.guard.recording = False  # fixture setup is not a finding (lifespan aside)
    return (yield)


def _checked(fn: Callable[..., Any], run: GuardRun) -> Callable[..., Any]:
    """The test function, followed by the after-test checks, failing on findings."""

    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def async_test(*args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            await run.enter_loop()
            try:
                result = await fn(*args, **kwargs)
            except Exception as exc:
                await run.leave_loop()
                run.verdict(exc)
                raise
            await run.leave_loop()
            run.verdict()
            return result

        return async_test

    @functools.wraps(fn)
    def sync_test(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            run.verdict(exc)
            raise
        run.verdict()
        return result

    return sync_test


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    run = item.stash.get(RUN_KEY, None)
    if run is None or not isinstance(item, pytest.Function):
        return (yield)
    original = item.obj
    item.obj = _checked(original, run)
    run.guard.recording = True
    try:
        return (yield)
    finally:
        item.obj = original
        run.guard.recording = False


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    try:
        result = yield
    finally:
        _lend_fixtures_to_asyncio(item, False)
        run = item.stash.get(RUN_KEY, None)
        if run is not None:
            run.stop()
        _warn_hook_failures()
    if run is not None:
        __tracebackhide__ = True
        run.verdict()  # what the app's shutdown or a fixture's teardown recorded since
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, None, object]:
    """Whatever happens to the test (an interrupt skips its teardown), its run is stopped
    and everything it patched is restored before the next test or the end of the session."""
    try:
        return (yield)
    finally:
        run = item.stash.get(RUN_KEY, None)
        if run is not None:
            run.stop()
            del item.stash[RUN_KEY]  # a finished test holds no app, client or loop
        waits.stop_if_idle()


def _warn_hook_failures() -> None:
    """Hooks of ours that failed and turned themselves off: one warning each. It is about
    the plugin, not the app, so a suite's ``filterwarnings = error`` does not fail on it."""
    notes = patching.take_warnings()
    if not notes:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("always", StallguardWarning)
        for note in notes:
            warnings.warn(StallguardWarning(note), stacklevel=2)


def _findings_text(error: StallFindings) -> str:
    text = str(error)
    if error.__cause__ is not None:
        text += (
            "\n\nThe test itself also failed (probably for the same reason): "
            f"{type(error.__cause__).__name__}: {error.__cause__}"
        )
    return text


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> pytest.TestReport | None:
    """A test that failed on findings gets their text as its failure, and no traceback:
    the findings name the lines. (Formatting the traceback would parse source files for
    nothing, and on CPython 3.11 that parse can fail with "AST constructor recursion depth
    mismatch", python/cpython#106905.)"""
    if call.excinfo is None or not call.excinfo.errisinstance(StallFindings):
        return None
    sections = [
        (f"Captured {key} {when}", content) for when, key, content in item._report_sections
    ]
    return pytest.TestReport(
        item.nodeid,
        item.location,
        dict.fromkeys(item.keywords, 1),
        "failed",
        _findings_text(cast(StallFindings, call.excinfo.value)),
        cast(Literal["setup", "call", "teardown"], call.when),
        sections,
        call.duration,
        user_properties=item.user_properties,
    )


@pytest.hookimpl(wrapper=True, specname="pytest_runtest_makereport")
def pytest_runtest_makereport_record(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    run = item.stash.get(RUN_KEY, None)
    if run is None:
        return report
    outcome = item.stash.get(OUTCOME_KEY, "passed")
    if report.when == "call":
        outcome = report.outcome
        if report.failed:
            _show_app_exception(report, run)
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
    elif report.failed:
        outcome = "failed" if outcome == "failed" else "error"
    elif report.skipped and report.when == "setup":
        outcome = "skipped"
    item.stash[OUTCOME_KEY] = outcome
    if report.when == "teardown":
        run.stop()
        record = TestRecord(
            nodeid=item.nodeid,
            outcome=outcome,
            findings=run.guard.findings,
            bursts=[b.detached() for b in run.bursts],
            pools=run.pool_stats(),
        )
        item.config.stash[REPORTER_KEY].add(record)
        del item.stash[RUN_KEY]  # per-test state goes with its report
    return report


def _show_app_exception(report: pytest.TestReport, run: GuardRun) -> None:
    """A failing test whose bursts got 500s: show the first exception the app raised
    (type, message, the app's own frames), not only ``assert 0 == 5``."""
    bursts = run.client.bursts if run.client is not None else run.bursts
    for burst in bursts:
        crash = burst.app_exception
        if crash is None:
            continue
        lines = [
            f"request #{crash.index} of the burst {burst.method} {burst.path} answered 500: "
            "the app raised",
            *_exception_lines(crash.exception),
        ]
        report.sections.append(("stallguard: the app raised during a burst", "\n".join(lines)))
        return


class _Reporter:
    """Collects the records and writes the reports at the end. On an xdist worker it hands
    its records to the controller through ``workeroutput``; the controller merges them."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.records: dict[str, TestRecord] = {}
        self.written: list[tuple[str, Path]] = []

    def add(self, record: TestRecord) -> None:
        self.records[record.nodeid] = record

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: object) -> None:
        output = getattr(node, "workeroutput", None) or {}
        for data in output.get("stallguard", ()):
            self.add(TestRecord.from_dict(data))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        config = self.config
        if config.getoption("--stall-report") or config.getini("stallguard_report"):
            terminalreporter.section("stallguard report")
            body = text_report.lines(self.records.values())
            for line in body or ["no bursts, pools or findings recorded"]:
                terminalreporter.write_line(line)
            terminalreporter.write_line(text_report.totals(self.records.values()))
        for what, path in self.written:
            terminalreporter.write_line(f"stallguard: {what} report written to {path}")

    def pytest_sessionfinish(self) -> None:
        config = self.config
        _warn_hook_failures()
        workeroutput = getattr(config, "workeroutput", None)
        if workeroutput is not None:  # an xdist worker: the controller writes the files
            workeroutput["stallguard"] = [r.to_dict() for r in self.records.values()]
            return
        report = data_report.build(self.records.values())
        path = config.getoption("--stall-report-json")
        if path:
            target = Path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(report, indent=2) + "\n")
            self.written.append(("JSON", target.resolve()))
        html_path = config.getoption("--stall-report-html")
        if html_path:
            from .report import html as html_report

            target = Path(html_path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(html_report.render(report))
            self.written.append(("HTML", target.resolve()))


# -- fixtures -----------------------------------------------------------------------------


def startup_failure(exc: BaseException, when: str) -> str:
    """The user's exception first, with the frames of their code, then one line saying
    when it happened; no pages of anyio and asgi-lifespan frames."""
    lines = _exception_lines(exc)
    lines.append(f"(This happened {when}, before the test body ran.)")
    return "\n".join(lines)


def _exception_lines(exc: BaseException) -> list[str]:
    """``Type: message``, then the frames of the user's own code (file:line, source)."""
    lines = ["".join(traceback.format_exception_only(type(exc), exc)).rstrip()]
    for f in traceback.extract_tb(exc.__traceback__):
        if location.is_user_file(f.filename):
            lines.append(f"  {location.relative(f.filename)}:{f.lineno} in {f.name}")
            if f.line:
                lines.append(f"    {f.line.strip()}")
    return lines


def _run_of(request: pytest.FixtureRequest) -> GuardRun:
    run: GuardRun | None = request.node.stash.get(RUN_KEY, None)
    if run is None:  # used from a fixture of a broader scope: no test to arm
        raise pytest.UsageError(
            f"{request.fixturename} is function-scoped: request it from a test or a "
            "function-scoped fixture"
        )
    return run


@pytest.fixture
def stall_app(request: pytest.FixtureRequest) -> Any:
    """The ASGI app under test, from ini ``stallguard_app``. Override it to return yours."""
    spec = request.config.getini("stallguard_app")
    if not spec:
        pytest.fail(
            "stallguard has no app to test: set stallguard_app = \"pkg.module:app\" (or "
            "\"pkg.module:create_app()\") in your pytest ini file, or define a fixture "
            "named stall_app that returns your ASGI app.",
            pytrace=False,
        )
    try:
        return load_app(spec)
    except AppLoadError as exc:
        failure = str(exc)
    except Exception as exc:  # the user's factory raised: their error, not our frames
        failure = startup_failure(exc, f"while stallguard_app = {spec!r} built the app")
    pytest.fail(failure, pytrace=False)  # outside the except: no chained trace


@pytest.fixture
def slow_upstream(request: pytest.FixtureRequest) -> SlowUpstreams:
    """Fake slow upstreams: ``slow_upstream("https://pay.example", delay=0.9)`` (respx,
    honouring the caller's timeouts and pool limits) or ``slow_upstream.serve(delay=...)``
    (a real HTTP server on 127.0.0.1). Stopped after the test."""
    return _run_of(request).upstreams


@pytest.fixture
def shrink_pools(request: pytest.FixtureRequest) -> ShrinkPools:
    """Make pools small for this test: ``.threads(n)``, ``.sqlalchemy(engine, ...)``,
    ``.httpx(client, ...)``, ``await .asyncpg(pool, ...)``. Restored after the test."""
    return _run_of(request).shrink


@pytest.fixture
def stall_guard(request: pytest.FixtureRequest) -> Guard:
    """The guard of this test: ``.findings``, ``.allow()``, ``.paused()``, ``.only()``."""
    return _run_of(request).guard


@pytest.fixture
async def stall_client(
    stall_app: Any, request: pytest.FixtureRequest
) -> AsyncIterator[StallClient]:
    """The app started in-process with its lifespan; an httpx client with burst/canary."""
    run = _run_of(request)
    try:
        async with running(stall_app, run.settings, run.guard) as client:
            run.client = client
            yield client
        return
    except TimeoutError as exc:
        if run.client is not None:
            raise
        failure = (
            f"the app's lifespan startup did not finish within "
            f"{run.settings.startup_timeout:g} s (stallguard startup_timeout). Raise it "
            "with the stallguard_startup_timeout ini or the marker's startup_timeout=, "
            f"or find what startup waits on. ({exc!r})"
        )
    except Exception as exc:
        if run.client is not None:
            raise
        failure = startup_failure(exc, "during the app's lifespan startup")
    pytest.fail(failure, pytrace=False)  # outside the except: no chained trace
