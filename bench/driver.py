"""Burst driver throughput against httpx.ASGITransport on the same trivial app, same run.

Prints requests/s for both and their ratio (SPEC target: driver >= 2.5x ASGITransport).
Run: python bench/driver.py [--requests 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import anyio
import httpx
from fastapi import FastAPI

from pytest_stallguard import burst
from pytest_stallguard.driver import build_spec

BATCH = 100


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    return app


async def with_httpx(app: FastAPI, total: int) -> float:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        await client.get("/ping")
        start = time.perf_counter()
        for _ in range(total // BATCH):
            async with anyio.create_task_group() as tg:
                for _ in range(BATCH):
                    tg.start_soon(client.get, "/ping")
        return total / (time.perf_counter() - start)


async def with_driver(app: FastAPI, total: int) -> float:
    specs = [build_spec("GET", "/ping")]
    await burst.run(app, specs, 1)
    start = time.perf_counter()
    for _ in range(total // BATCH):
        result = await burst.run(app, specs, BATCH)
        assert result.statuses[200] == BATCH, result.statuses
    return total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    app = make_app()
    ratios = []
    for i in range(args.rounds):
        base = anyio.run(with_httpx, app, args.requests)
        ours = anyio.run(with_driver, app, args.requests)
        ratios.append(ours / base)
        print(f"round {i + 1}: ASGITransport {base:8.0f} req/s  driver {ours:8.0f} req/s  "
              f"ratio {ours / base:.2f}x")
    print(f"median ratio driver/ASGITransport: {statistics.median(ratios):.2f}x "
          f"(target >= 2.5x; {args.requests} requests in batches of {BATCH})")


if __name__ == "__main__":
    main()
