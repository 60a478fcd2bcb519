"""Run every example test against the fixed shop and the broken one.

Every test must pass on the fixed shop, and is an expected failure on the broken one: it
must fail, and fail because stallguard found something (``StallFindings``), not for any
other reason. That includes the plain functional tests: any test that uses
``stall_client`` runs with the guard armed, so one request that blocks the loop is enough.
"""

from __future__ import annotations

import importlib

import pytest

from pytest_stallguard import StallFindings

BROKEN = pytest.mark.xfail(
    raises=StallFindings, strict=True, reason="the broken shop must be caught by stallguard"
)


@pytest.fixture(params=["fixed", "broken"])
def stall_app(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    module = importlib.import_module(f"shop.{request.param}")
    return module.create_app()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        broken = callspec is not None and callspec.params.get("stall_app") == "broken"
        if broken:
            item.add_marker(BROKEN)
