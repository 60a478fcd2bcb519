"""Starting a thread waits for it to run: on a loaded machine that is a pause on the loop
the first time a library starts a worker. It is not the app's loop stall."""

from __future__ import annotations

import pytest

APP = """
import threading
import time

import anyio
from fastapi import FastAPI


class SlowToStart(threading.Thread):
    # What a loaded machine does to every new thread: it runs late, and start() waits.
    def _bootstrap_inner(self):
        time.sleep(0.08)
        super()._bootstrap_inner()


def create_app():
    app = FastAPI()

    @app.get("/starts-a-thread")
    async def starts_a_thread():
        worker = SlowToStart(target=lambda: None)
        worker.start()
        await anyio.to_thread.run_sync(worker.join)
        return {"ok": True}

    @app.get("/burns")
    async def burns():
        deadline = time.thread_time() + 0.08
        while time.thread_time() < deadline:  # BURN-LINE
            pass
        return {"ok": True}

    return app
"""


def test_thread_start_is_not_a_loop_stall_but_cpu_work_is(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(myapp=APP)
    pytester.syspathinsert()
    pytester.makepyfile(
        """
        import pytest
        from myapp import create_app

        @pytest.fixture
        def stall_app():
            return create_app()

        async def test_thread(stall_client):
            assert (await stall_client.get("/starts-a-thread")).status_code == 200

        async def test_burn(stall_client):
            assert (await stall_client.get("/burns")).status_code == 200
        """
    )
    result = pytester.runpytest("-p", "no:asyncio", "--stall-report-json=r.json")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_burn*", "*loop-stall*GET /burns*myapp.py:*"])
    import json

    tests = {t["nodeid"].split("::")[1]: t for t in json.loads((pytester.path / "r.json").read_text())["tests"]}
    assert tests["test_thread[asyncio]"]["findings"] == []
    assert [f["kind"] for f in tests["test_burn[asyncio]"]["findings"]] == ["loop-stall"]
