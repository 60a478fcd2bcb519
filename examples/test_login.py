"""Logins under load must not freeze the rest of the shop."""

from __future__ import annotations

import pytest

CREDENTIALS = {"user": "ada", "password": "lovelace"}


@pytest.mark.concurrency(canary="/health")
async def test_logins_keep_the_shop_responsive(stall_client):
    result = await stall_client.burst("POST", "/login", n=10, json=CREDENTIALS)

    assert result.statuses[200] == 10
    # The canary (GET /health, probed during the burst) is judged by the plugin:
    # the test fails if its p95 slows down past max_canary_slowdown x its baseline.


async def test_wrong_password_is_refused(stall_client):
    response = await stall_client.post("/login", json={"user": "ada", "password": "nope"})
    assert response.status_code == 401
