"""Run every example test against the fixed shop and the broken one.

Functional tests must pass on both. Concurrency tests (``@pytest.mark.concurrency``) must
pass on the fixed shop, and are expected failures on the broken one: they must fail, and
fail because stallguard found something (``StallFindings``), not for any other reason.
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
        if broken and item.get_closest_marker("concurrency") is not None:
            item.add_marker(BROKEN)
