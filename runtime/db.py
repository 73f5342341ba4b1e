"""PostgreSQL connection pools for the async services."""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool


async def open_pool(
    database_url: str, min_size: int = 1, max_size: int = 8
) -> AsyncConnectionPool[Any]:
    """An open pool. A connection broken by a server restart fails one request (503) and is
    then discarded; checking each one on checkout would cost a round trip per request."""
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        open=False,
        timeout=10,
    )
    await pool.open(wait=True, timeout=30)
    return pool
