"""The shop as it is often first written: every endpoint has a classic async pitfall."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import requests
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel
from sqlalchemy import func, select

from .config import ShopConfig
from .db import open_database, orders
from .images import thumbnail
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
        app.state.db = await open_database(config.database_url)
        yield
        await app.state.db.dispose()

    app = FastAPI(title="shop (broken)", lifespan=lifespan)
    storage = Path(config.uploads_dir)
    storage.mkdir(parents=True, exist_ok=True)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/login")
    async def login(body: Login) -> dict[str, str]:
        # PITFALL: ~30 ms of CPU on the event loop per login; every other request waits.
        digest = hash_password(body.password)
        if USERS.get(body.user) != digest:
            raise HTTPException(status_code=401, detail="bad credentials")
        return {"token": f"token-{body.user}"}

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, object]:
        data = await request.body()
        name = uuid.uuid4().hex
        # PITFALL: a sync file write on the event loop...
        with open(storage / f"{name}.bin", "wb") as out:
            out.write(data)
        # ...and a thumbnail computed on it, inside the request.
        (storage / f"{name}.thumb").write_bytes(thumbnail(data))
        return {"id": name, "size": len(data)}

    @app.get("/search")
    async def search(q: str) -> dict[str, object]:
        # PITFALL: the search vendor's SDK is sync (requests): the loop waits for the network.
        reply = requests.get(f"{config.search_url}/search", params={"q": q}, timeout=2)
        return {"q": q, "results": reply.json()}

    @app.post("/checkout")
    async def checkout(order: Order) -> dict[str, object]:
        # PITFALL: a new client (pool, TLS setup) per request, and no timeout at all: a slow
        # payment API holds every checkout, and its connections, as long as it likes.
        async with httpx.AsyncClient(timeout=None) as client:
            reply = await client.post(f"{config.payments_url}/charge", json=order.model_dump())
        return {"order": order.item, "payment": reply.json()}

    @app.get("/dashboard")
    async def dashboard() -> dict[str, object]:
        async with app.state.db.connect() as conn:
            count = (await conn.execute(select(func.count()).select_from(orders))).scalar_one()
            # PITFALL: the connection stays checked out while we wait for another service.
            async with httpx.AsyncClient(timeout=2) as client:
                stats = (await client.get(f"{config.stats_url}/stats")).json()
        return {"orders": count, "stats": stats}

    return app
