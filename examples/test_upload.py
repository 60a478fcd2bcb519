"""Uploads must be stored and answered without holding up the rest of the shop."""

from __future__ import annotations

import pytest

PICTURE = bytes(range(256)) * 800  # 200 kB


@pytest.mark.concurrency(canary="/health")
async def test_uploads_under_load(stall_client):
    result = await stall_client.burst("POST", "/upload", n=20, content=PICTURE)

    assert result.ok == 20  # stored (201/200) or accepted for processing (202)


async def test_upload_answers_with_an_id(stall_client):
    response = await stall_client.post("/upload", content=b"tiny")
    assert response.status_code in (200, 202)
    assert response.json()["size"] == 4
