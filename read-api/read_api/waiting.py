"""Read-your-writes: wait (bounded) until a read model has applied a position."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import psycopg_pool

from runtime.http import Problems, problem

Reached = Callable[[psycopg.AsyncConnection[Any], int], Awaitable[bool]]


class NotYetProjected(Exception):
    """The read model has not reached the position the client asked for, in time."""


async def await_position(
    pool: psycopg_pool.AsyncConnectionPool[Any],
    reached: Reached,
    position: int | None,
    wait_seconds: float,
) -> None:
    """Returns once `reached(conn, position)`; NotYetProjected after `wait_seconds`."""
    if position is None:
        return
    deadline = time.monotonic() + wait_seconds
    pause = 0.005
    while True:
        async with pool.connection() as conn:
            if await reached(conn, position):
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
