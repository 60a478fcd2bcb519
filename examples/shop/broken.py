"""The shop as it is often first written: every endpoint has a classic async pitfall."""

from __future__ import annotations

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from .security import USERS, hash_password


class Login(BaseModel):
    user: str
    password: str


def create_app() -> FastAPI:
    app = FastAPI(title="shop (broken)")

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

    return app
