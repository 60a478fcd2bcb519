"""The shop's database: one table of orders, on SQLAlchemy's async engine."""

from __future__ import annotations

from sqlalchemy import Column, Integer, MetaData, String, Table
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool

metadata = MetaData()
orders = Table(
    "orders",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("item", String, nullable=False),
)


async def open_database(url: str) -> AsyncEngine:
    # Ten connections, no overflow: the database's real limit, shared by every worker.
    # The pool class is named because SQLAlchemy before 2.0.38 gives SQLite files none.
    engine = create_async_engine(
        url, poolclass=AsyncAdaptedQueuePool, pool_size=10, max_overflow=0, pool_timeout=5
    )
    async with engine.begin() as conn:
        await conn.run_sync(metadata.drop_all)
        await conn.run_sync(metadata.create_all)
        await conn.execute(orders.insert(), [{"item": f"teapot {i}"} for i in range(20)])
    return engine
