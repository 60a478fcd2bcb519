"""The same shop with each pitfall fixed the way the article recommends."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import sqlalchemy.exc
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import func, select

from .config import ShopConfig
from .db import open_database, orders
from .security import USERS, hash_password


class Login(BaseModel):
    user: str
    password: str


class Order(BaseModel):
    item: str
    amount_cents: int


def create_app(config: ShopConfig | None = None) -> FastAPI:
    config = config or ShopConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # FIX: one client for the app's life, with timeouts and a bounded pool.
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(1.0, connect=0.5),
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=20),
        ) as http:
            app.state.http = http
            app.state.db = await open_database(config.database_url)
            yield
            await app.state.db.dispose()

    storage = Path(config.uploads_dir)
    storage.mkdir(parents=True, exist_ok=True)
    # Jobs for the out-of-process worker (`python -m shop.worker DIR`), which makes the
    # thumbnails. CPU work in a thread of the web process would still hold the GIL and
    # starve the event loop; a separate process does not.
    jobs: list[str] = []
    # File writes go to worker threads, a few at a time: starting 40 threads at once in a
    # burst costs the loop more than the writes themselves.
    disk = anyio.CapacityLimiter(4)

    app = FastAPI(title="shop (fixed)", lifespan=lifespan)
    # CPU-bound work gets its own small pool: hashing in 40 threads at once would starve
    # the event loop of CPU just as surely as hashing on it. Leave a core for the loop.
    hashing = anyio.CapacityLimiter(max(1, (os.cpu_count() or 2) - 1))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/login")
    async def login(body: Login) -> dict[str, str]:
        # FIX: hashlib releases the GIL, so a worker thread keeps the loop free.
        digest = await anyio.to_thread.run_sync(hash_password, body.password, limiter=hashing)
        if USERS.get(body.user) != digest:
            raise HTTPException(status_code=401, detail="bad credentials")
        return {"token": f"token-{body.user}"}

    @app.post("/upload", status_code=202)
    async def upload(request: Request) -> JSONResponse:
        data = await request.body()
        name = uuid.uuid4().hex
        path = storage / f"{name}.bin"
        # FIX: store without blocking the loop, queue the thumbnail, answer 202 with a job id.
        await anyio.to_thread.run_sync(path.write_bytes, data, limiter=disk)
        jobs.append(name)
        return JSONResponse({"job": name, "size": len(data)}, status_code=202)

    @app.get("/search")
    async def search(q: str, request: Request) -> dict[str, object]:
        # FIX: the search API through the shared async client.
        reply = await request.app.state.http.get(f"{config.search_url}/search", params={"q": q})
        return {"q": q, "results": reply.json()}

    @app.post("/checkout")
    async def checkout(order: Order, request: Request) -> JSONResponse:
        try:
            reply = await request.app.state.http.post(
                f"{config.payments_url}/charge", json=order.model_dump()
            )
        except httpx.TimeoutException:
            # FIX: a slow provider becomes a quick, clear error instead of a pile-up.
            return JSONResponse({"error": "payment provider timed out"}, status_code=503)
        return JSONResponse({"order": order.item, "payment": reply.json()})

    @app.get("/dashboard")
    async def dashboard(request: Request) -> JSONResponse:
        # FIX: query, give the connection back, and only then wait for the other service.
        try:
            async with app.state.db.connect() as conn:
                query = select(func.count()).select_from(orders)
                count = (await conn.execute(query)).scalar_one()
        except sqlalchemy.exc.TimeoutError:
            # FIX: every connection busy for longer than the pool timeout: a clean 503.
            return JSONResponse({"error": "database busy, try again"}, status_code=503)
        stats = (await request.app.state.http.get(f"{config.stats_url}/stats")).json()
        return JSONResponse({"orders": count, "stats": stats})

    return app
