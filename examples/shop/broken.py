"""The shop as it is often first written: every endpoint has a classic async pitfall."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel

from .images import thumbnail
from .security import USERS, hash_password


class Login(BaseModel):
    user: str
    password: str


def create_app() -> FastAPI:
    app = FastAPI(title="shop (broken)")
    storage = Path(tempfile.mkdtemp(prefix="shop-uploads-"))

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

    return app
