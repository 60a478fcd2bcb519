"""The dashboard reads the database and a stats service."""

from __future__ import annotations

import pytest


@pytest.mark.concurrency(canary="/health")
async def test_dashboard_under_load(stall_client):
    # As many requests as the pool has connections (shop/db.py): the fixed shop never
    # waits for one, however busy the machine, while the broken one is still caught.
    result = await stall_client.burst("GET", "/dashboard", n=10)
    assert result.statuses[200] == 10


async def test_dashboard_shows_orders_and_visits(stall_client):
    response = await stall_client.get("/dashboard")
    assert response.json() == {"orders": 20, "stats": {"visits": 42}}


@pytest.mark.broken_fails_with(raises=AssertionError)
async def test_exhausted_pool_ends_in_a_clean_503(
    stall_client, stall_app, shrink_pools, stall_guard
):
    # Force it: one connection, a 50 ms pool timeout, and the test holds that connection.
    shrink_pools.sqlalchemy(stall_app.state.db, size=1, overflow=0, timeout=0.05)
    with stall_guard.paused():  # exhaustion is the point here, not a finding
        async with stall_app.state.db.connect():
            result = await stall_client.burst("GET", "/dashboard", n=10)

    assert result.statuses == {503: 10}  # a controlled answer, not a crash or a hang
    # and the pool is usable again right after
    assert (await stall_client.get("/dashboard")).status_code == 200
