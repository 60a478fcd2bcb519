"""The same shop with each pitfall fixed the way the article recommends."""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

import anyio
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from .security import USERS, hash_password


class Login(BaseModel):
    user: str
    password: str


def create_app() -> FastAPI:
    storage = Path(tempfile.mkdtemp(prefix="shop-uploads-"))
    # Jobs for the out-of-process worker (`python -m shop.worker DIR`), which makes the
    # thumbnails. CPU work in a thread of the web process would still hold the GIL and
    # starve the event loop; a separate process does not.
    jobs: list[str] = []
    # File writes go to worker threads, a few at a time: starting 40 threads at once in a
    # burst costs the loop more than the writes themselves.
    disk = anyio.CapacityLimiter(4)

    app = FastAPI(title="shop (fixed)")
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

    return app
