"""Search calls a vendor's API: it must not freeze the shop while it waits."""

from __future__ import annotations

import pytest


@pytest.mark.concurrency(canary="/health")
async def test_search_under_load(stall_client):
    result = await stall_client.burst("GET", "/search", n=30, params={"q": "tea"})
    assert result.statuses[200] == 30


async def test_search_returns_results(stall_client):
    response = await stall_client.get("/search", params={"q": "tea"})
    assert response.json() == {"q": "tea", "results": ["teapot", "kettle"]}
