"""How a read model's tables are swapped for a rebuilt copy without a reader seeing a mix.

A projection applies every batch holding its model's lock in shared mode
(`applying`); a rebuild takes it exclusively (`swapping`) for the short
transaction in which it brings the copy level with the live tables, compares
them and renames the copy into place. So no batch is applied to the old tables
after the comparison, and readers see the old tables or the new ones, never both.
"""

from __future__ import annotations

from typing import Any

import psycopg

_KEY = "carelog.readmodel.{}"


async def applying(cur: psycopg.AsyncCursor[Any], model: str) -> None:
    """Inside a projection's transaction: hold the model's lock, shared with other appliers."""
    await cur.execute("SELECT pg_advisory_xact_lock_shared(hashtext(%s))", [_KEY.format(model)])


async def swapping(conn: psycopg.AsyncConnection[Any], model: str) -> None:
    """Inside a rebuild's transaction: hold the model's lock alone (waits for a batch)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [_KEY.format(model)])
