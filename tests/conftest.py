"""Shared helpers for the plugin's own tests."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest_plugins = ["pytester"]

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
        t = time.perf_counter()
        while time.perf_counter() - t < 0.04:
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
