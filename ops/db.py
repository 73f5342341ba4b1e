"""PostgreSQL connection pools for the async services."""

from __future__ import annotations

from typing import Any

from psycopg_pool import AsyncConnectionPool


async def open_pool(
    database_url: str, min_size: int = 1, max_size: int = 8
) -> AsyncConnectionPool[Any]:
    """An open pool whose connections are checked on checkout, so a restarted server heals."""
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        open=False,
        check=AsyncConnectionPool.check_connection,
        timeout=10,
    )
    await pool.open(wait=True, timeout=30)
    return pool
