"""Shared helpers for the plugin's own tests."""

from __future__ import annotations

import inspect
import json
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pytest_stallguard import context, location, patching
from pytest_stallguard.loopwatch import steps
from pytest_stallguard.upstream import SlowUpstreams

pytest_plugins = ["pytester"]

# Backends for anyio tests: the full matrix, and the two shorthands with their reasons
# written where they are used (asyncio-only libraries, task semantics).
BACKENDS = [
    pytest.param(("asyncio", {}), id="asyncio"),
    # asyncio timed by the Python step hook, not the C one (loopwatch/_cstep.c): both run
    # the same tests (where the C hook is not built, this is the same as "asyncio")
    pytest.param(("asyncio", {}), id="asyncio-python-hook", marks=pytest.mark.python_hook),
    pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    pytest.param(("trio", {}), id="trio"),
]
BOTH = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"], indirect=True)
ASYNCIO = pytest.mark.parametrize("anyio_backend", ["asyncio"], indirect=True)


@pytest.fixture
def upstreams() -> Iterator[SlowUpstreams]:
    """Slow upstream fakes for a test, stopped after it."""
    with SlowUpstreams() as factory:
        yield factory


@pytest.fixture
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """asyncio unless a test parametrizes it (BOTH, ASYNCIO) or a module overrides it."""
    return str(getattr(request, "param", "asyncio"))

APP = '''
import time
import anyio
from contextlib import asynccontextmanager
from fastapi import FastAPI


@asynccontextmanager
async def lifespan(app):
    app.state.started = True
    yield {"greeting": "hello"}


def create_app():
    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.get("/state")
    async def state(request: __import__("fastapi").Request):
        return {"greeting": request.state.greeting, "started": app.state.started}

    @app.get("/slow")
    async def slow():
        await anyio.sleep(0.05)
        return {"ok": True}

    @app.post("/echo")
    async def echo(body: dict):
        return body

    @app.get("/hold")
    async def hold():
        # 60 ms of this thread's CPU (3x the default threshold), not of the wall clock:
        # on a loaded machine the hold is as long, however often the thread is preempted
        # (and the loop watch discounts preemption).
        t = time.thread_time()
        while time.thread_time() - t < 0.06:
            pass
        return {"ok": True}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("boom")

    return app


app = create_app()
'''


@pytest.fixture
def shop(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester dir with a FastAPI app in myapp.py and stallguard_app pointing at it."""
    pytester.makepyfile(myapp=APP)
    pytester.makeini(
        """
        [pytest]
        stallguard_app = myapp:create_app()
        """
    )
    pytester.syspathinsert()
    return pytester


def load_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def dedent(text: str) -> str:
    return textwrap.dedent(text)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "python_hook: time asyncio's steps with the Python hook, not the C one"
    )


@pytest.fixture(autouse=True)
def _step_hook(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The python_hook marker (a backend of BACKENDS): the Python versions of the C hooks."""
    if request.node.get_closest_marker("python_hook") is not None:
        monkeypatch.setattr(steps, "_cstep", None)


@pytest.fixture(autouse=True)
def _nothing_left_patched() -> Iterator[None]:
    """After every test of ours, no patch of the plugin's is still installed."""
    yield
    left = patching.restore_all()
    assert not left, f"still patched after the test: {', '.join(map(str, left))}"


@pytest.fixture(autouse=True)
def _rooted(request: pytest.FixtureRequest) -> Iterator[None]:
    """Findings name files relative to the rootdir; other tests (pytester runs of the
    plugin) may have pointed the module-wide root elsewhere."""
    previous = location._root
    location.set_root(str(request.config.rootpath))
    try:
        yield
    finally:
        location._root = previous


def line_of(func: Callable[..., Any], text_: str) -> int:
    lines, start = inspect.getsourcelines(func)
    for offset, line in enumerate(lines):
        if text_ in line:
            return start + offset
    raise AssertionError(f"{text_!r} not in {func.__name__}")


def asgi_client(app: Any) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=context.attributed(app), raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")
