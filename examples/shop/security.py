"""Password hashing, slow on purpose (as it must be)."""

from __future__ import annotations

import hashlib

SALT = b"shop-example-salt"
ROUNDS = 120_000  # about 65 ms on a CI core: a realistic cost for a login


def hash_password(password: str) -> str:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), SALT, ROUNDS).hex()


USERS = {"ada": hash_password("lovelace")}
