"""Run every example test against the fixed shop and the broken one.

Every test must pass on the fixed shop, and is an expected failure on the broken one: it
must fail, and fail because stallguard found something (``StallFindings``), not for any
other reason. That includes the plain functional tests: any test that uses
``stall_client`` runs with the guard armed, so one request that blocks the loop is enough.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from shop.config import ShopConfig

from pytest_stallguard import StallFindings

BROKEN_REASON = "the broken shop must be caught"
BROKEN = pytest.mark.xfail(raises=StallFindings, strict=True, reason=BROKEN_REASON)


PAYMENTS = "https://payments.example"


@pytest.fixture
def shop_config(slow_upstream, tmp_path) -> ShopConfig:  # type: ignore[no-untyped-def]
    """The shop's neighbours, faked: a real search server on loopback (the sync SDK
    needs real sockets), a respx fake of the payment API, a real stats server."""
    search = slow_upstream.serve(delay=0.02, json=["teapot", "kettle"])
    stats = slow_upstream.serve(delay=0.2, json={"visits": 42})
    slow_upstream(PAYMENTS, delay=0.05, json={"status": "paid"})
    return ShopConfig(
        search_url=search.url,
        payments_url=PAYMENTS,
        stats_url=stats.url,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}",
        uploads_dir=str(tmp_path / "uploads"),
    )


@pytest.fixture(scope="module", autouse=True)
def _leaves_no_temp_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Each example module must remove whatever it made with ``tempfile`` (the shop once
    left a ``shop-uploads-*`` folder per app): ``tempfile`` points at a private, empty
    folder while the module runs, and that folder must be empty again at its end."""
    tmp_path_factory.getbasetemp()  # pytest's own temp root stays where it belongs
    private = Path(tempfile.mkdtemp(prefix="stallguard-examples-"))
    private.chmod(0o755)  # the embedded PostgreSQL runs as a system user when we are root
    previous, tempfile.tempdir = tempfile.tempdir, str(private)
    try:
        yield
    finally:
        tempfile.tempdir = previous
        left = sorted(p.name for p in private.iterdir())
        shutil.rmtree(private, ignore_errors=True)
    assert not left, f"left in the temp dir: {', '.join(left)}"


@pytest.fixture(params=["fixed", "broken"])
def stall_app(request: pytest.FixtureRequest, shop_config: ShopConfig) -> object:
    module = importlib.import_module(f"shop.{request.param}")
    return module.create_app(shop_config)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "broken_fails_with(raises=exc): the broken shop fails this test with exc, not "
        "StallFindings (a functional check of error handling the guard stays out of)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        broken = callspec is not None and callspec.params.get("stall_app") == "broken"
        if not broken:
            continue
        expected = item.get_closest_marker("broken_fails_with")
        if expected is None:
            item.add_marker(BROKEN)
        else:
            raises = expected.kwargs["raises"]
            item.add_marker(pytest.mark.xfail(raises=raises, strict=True, reason=BROKEN_REASON))
