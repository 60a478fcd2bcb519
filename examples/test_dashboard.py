"""The dashboard reads the database and a stats service."""

from __future__ import annotations

import pytest


@pytest.mark.concurrency(canary="/health")
async def test_dashboard_under_load(stall_client):
    result = await stall_client.burst("GET", "/dashboard", n=20)
    assert result.statuses[200] == 20


async def test_dashboard_shows_orders_and_visits(stall_client):
    response = await stall_client.get("/dashboard")
    assert response.json() == {"orders": 20, "stats": {"visits": 42}}
