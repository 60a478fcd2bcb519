"""An app installed as a package (a server run from its wheel): findings point at the
app's own package, named as the package names it, not at pathlib.py or nowhere."""

from __future__ import annotations

import json

import pytest

PACKAGE = """
import time

from fastapi import FastAPI


def create_app():
    app = FastAPI()

    @app.get("/sleepy")
    async def sleepy():
        time.sleep(0.03)  # SLEEP-LINE
        return {"ok": True}

    @app.get("/file")
    async def read_file():
        return {"n": _size()}

    return app


def _size():
    with open(__file__, "rb") as f:  # OPEN-LINE
        return len(f.read())
"""


def _line(marker: str) -> int:
    return next(i for i, text in enumerate(PACKAGE.splitlines(), 1) if marker in text)


def test_findings_in_an_installed_app_point_into_its_package(pytester: pytest.Pytester) -> None:
    site = pytester.path / "venv" / "lib" / "site-packages"
    (site / "shopapp").mkdir(parents=True)
    (site / "shopapp" / "__init__.py").write_text(PACKAGE)
    pytester.makepyfile(
        f"""
        import sys
        sys.path.insert(0, {str(site)!r})

        import httpx
        import pytest
        from shopapp import create_app

        @pytest.mark.anyio
        @pytest.mark.parametrize("path", ["/sleepy", "/file"])
        async def test_it(path):
            transport = httpx.ASGITransport(app=create_app())
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get(path)).status_code == 200
        """
    )
    result = pytester.runpytest(
        "-p", "no:asyncio", "-k", "asyncio", "--stall-guard", "--stall-report-json=r.json"
    )
    result.assert_outcomes(failed=2)
    report = json.loads((pytester.path / "r.json").read_text())
    found = {
        (f["file"], f["line"], f["function"], f["request"])
        for t in report["tests"]
        for f in t["findings"]
    }
    assert found == {
        ("shopapp/__init__.py", _line("SLEEP-LINE"), "sleepy", "GET /sleepy"),
        ("shopapp/__init__.py", _line("OPEN-LINE"), "_size", "GET /file"),
    }
