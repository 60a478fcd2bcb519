"""Checkout talks to a payment API that is usually quick and sometimes very slow."""

from __future__ import annotations

import pytest
from conftest import PAYMENTS

ORDER = {"item": "teapot", "amount_cents": 2500}
SLOW_PROVIDER_S = 3.0


@pytest.mark.concurrency(canary="/health")
async def test_checkout_under_load(stall_client):
    result = await stall_client.burst("POST", "/checkout", n=30, json=ORDER)
    assert result.statuses[200] == 30


async def test_slow_payment_api_ends_in_a_clean_error(stall_client, slow_upstream):
    # The provider now takes 3 s to answer: checkouts must fail fast and clearly.
    slow = slow_upstream(PAYMENTS, delay=SLOW_PROVIDER_S, json={"status": "paid"})
    result = await stall_client.burst("POST", "/checkout", n=10, json=ORDER, timeout=5)

    assert result.statuses[503] == 10
    assert slow.timed_out == 10
    # Nobody waited for the slow provider (a request that had would have taken 3 s; the
    # shop gives up after its 1 s timeout).
    assert result.max_ms < SLOW_PROVIDER_S * 1000
