"""Read-your-writes: wait (bounded) until a read model has applied a position."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import psycopg_pool

from readmodels.tracking import reached
from runtime.http import Problems, problem


class NotYetProjected(Exception):
    """The read model has not reached the position the client asked for, in time."""


async def await_position(
    pool: psycopg_pool.AsyncConnectionPool[Any],
    positions: str,
    position: int | None,
    wait_seconds: float,
) -> None:
    """Returns once the read model whose positions table this is has applied `position`;
    NotYetProjected after `wait_seconds`."""
    if position is None:
        return
    deadline = time.monotonic() + wait_seconds
    pause = 0.005
    while True:
        async with pool.connection() as conn:
            if await reached(conn, positions, position):
                return
        if time.monotonic() + pause > deadline:
            raise NotYetProjected()
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.1)


PROBLEMS: Problems = {
    NotYetProjected: lambda exc: problem(
        503,
        "the read model has not reached minPosition yet; retry shortly",
        headers={"Retry-After": "1"},
    ),
}
