"""PostgreSQL connection pools for the async services."""

from __future__ import annotations

import asyncio
import select
from collections.abc import Iterable, Sequence
from typing import Any

import structlog
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg_pool import AsyncConnectionPool

log = structlog.get_logger(__name__)


async def open_pool(
    database_url: str, min_size: int = 1, max_size: int = 8, autocommit: bool = False
) -> AsyncConnectionPool[Any]:
    """An open pool whose connections are checked as they are handed out.

    `autocommit=True` for a pool that only reads: a statement outside `transaction()`
    then costs no COMMIT round trip when the connection goes back.

    A server restart (or a terminated backend) leaves the pool holding connections
    that are already closed; the check finds one before a request does, and the pool
    hands out another. The first broken one also has every idle connection checked at
    once, so the rest are replaced together rather than discovered one request at a
    time.

    The check costs no round trip while the connection is quiet (see `quiet`); one
    the server has said anything on since gets an empty query.
    """
    sweeping: set[asyncio.Task[None]] = set()

    async def check(conn: Any) -> None:
        try:
            if not quiet(conn):
                await AsyncConnectionPool.check_connection(conn)
        except Exception:
            if not sweeping:
                log.warning("pooled database connection broken; checking the others")
                task = asyncio.get_running_loop().create_task(pool.check())
                sweeping.add(task)
                task.add_done_callback(sweeping.discard)
            raise

    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        open=False,
        timeout=10,
        check=check,
        kwargs={"autocommit": autocommit},
    )
    await pool.open(wait=True, timeout=30)
    return pool


def quiet(conn: Any) -> bool:
    """True when an idle pooled connection has nothing waiting to be read.

    A server that ends a backend (a restart, `pg_terminate_backend`) says so and closes
    the socket, which makes it readable; so does anything else the server sends
    unasked. A quiet socket is one the server has not touched since the connection went
    back to the pool: handed out as it is, without the round trip of an empty query.
    """
    if conn.closed or conn.info.transaction_status != TransactionStatus.IDLE:
        return False
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN | select.POLLPRI)
    return not poller.poll(0)


def rendered(statement: sql.Composable) -> bytes:
    """A composed statement as the bytes sent to the server, rendered once.

    psycopg renders a `sql.Composed` again at every execute (quoting each identifier
    through libpq): a hot statement built from identifiers is rendered once at start
    instead, and psycopg's own statement cache keys on the bytes.
    """
    return statement.as_bytes(None)


def arrays(rows: Iterable[Sequence[Any]]) -> list[list[Any]]:
    """Rows as the arrays of a statement that inserts or updates many from `unnest`: one
    list per column, in row order."""
    return [list(column) for column in zip(*rows, strict=True)]


def render_statements(holder: object) -> None:
    """Replaces each composed statement among `holder`'s attributes by its rendering (see
    `rendered`): for stores that build their SQL from identifiers once, at start."""
    for name, value in list(vars(holder).items()):
        if isinstance(value, sql.Composable):
            setattr(holder, name, rendered(value))
