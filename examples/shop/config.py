"""Where the shop's neighbours live: the search service, the payment API, the stats API."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShopConfig:
    search_url: str = "http://127.0.0.1:9001"
    payments_url: str = "https://payments.example"
    stats_url: str = "http://127.0.0.1:9002"
    database_url: str = "sqlite+aiosqlite:///shop.db"
    uploads_dir: str = "uploads"  # where uploaded files are stored (created if missing)
