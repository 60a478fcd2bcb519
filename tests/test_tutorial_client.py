"""The FastAPI tutorial's way to test: ``client = TestClient(app)`` at module level and
plain sync tests. ``--stall-guard`` must see those requests, on TestClient's own loop."""

from __future__ import annotations

import json

import pytest

APP = """
import time

from fastapi import FastAPI

app = FastAPI()


@app.get("/ok")
async def ok():
    return {"ok": True}


@app.get("/sleepy")
async def sleepy():
    time.sleep(0.03)  # SLEEP-LINE
    return {"ok": True}


@app.get("/cpu")
async def cpu():
    deadline = time.thread_time() + 0.1
    while time.thread_time() < deadline:  # CPU-LINE
        pass
    return {"ok": True}
"""

TESTS = """
from fastapi.testclient import TestClient

from main import app

client = TestClient(app)  # built while pytest imports this module


def test_sleepy():
    assert client.get("/sleepy").status_code == 200


def test_cpu():
    assert client.get("/cpu").status_code == 200


def test_clean():
    assert client.get("/ok").status_code == 200


def test_with_block():
    with TestClient(app) as local:
        assert local.get("/cpu").status_code == 200
"""


def _line(marker: str) -> int:
    return next(i for i, text in enumerate(APP.splitlines()) if marker in text)


def test_module_level_testclient_is_watched(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(main=APP, test_main=TESTS)
    pytester.syspathinsert()
    # A fresh process: starlette.testclient is first imported by the test module, after
    # the plugin was configured, as in a user's suite.
    result = pytester.runpytest_subprocess(
        "-p", "no:asyncio", "--stall-guard", "--stall-report-json=r.json", timeout=300
    )
    result.assert_outcomes(passed=1, failed=3)
    tests = {
        t["nodeid"].split("::")[1]: t
        for t in json.loads((pytester.path / "r.json").read_text())["tests"]
    }
    assert tests["test_clean"]["findings"] == []
    (sleepy,) = tests["test_sleepy"]["findings"]
    assert (sleepy["kind"], sleepy["line"], sleepy["request"]) == (
        "blocking-call", _line("SLEEP-LINE"), "GET /sleepy"
    )
    for name in ("test_cpu", "test_with_block"):
        stalls = [f for f in tests[name]["findings"] if f["kind"] == "loop-stall"]
        assert stalls, tests[name]
        assert {(f["file"], f["request"]) for f in stalls} == {("main.py", "GET /cpu")}
