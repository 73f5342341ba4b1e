"""Pieces every benchmark uses: closed-loop load, the PostgreSQL insert floor, a token."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import psycopg

import bootstrap.database
from bench.loadgen import Connection, Reply, percentile
from runtime.settings import Settings

CONCURRENCY = 16
INSERTS = 3000


@dataclass
class Load:
    latencies: list[float]
    seconds: float
    failures: int

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def p(self, fraction: float) -> float:
        return percentile(self.latencies, fraction) * 1000


async def closed_loop(
    base: str,
    request: Callable[[Connection, int], Awaitable[Reply]],
    total: int,
    concurrency: int = CONCURRENCY,
    ok: tuple[int, ...] = (200, 201),
) -> Load:
    """`total` requests over `concurrency` keep-alive connections, each waiting for its answer."""
    connections = [Connection(base) for _ in range(concurrency)]
    latencies: list[float] = []
    failures = 0
    counter = iter(range(total))

    async def worker(conn: Connection) -> None:
        nonlocal failures
        for i in counter:
            reply = await request(conn, i)
            if reply.status in ok:
                latencies.append(reply.seconds)
            else:
                failures += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    seconds = time.perf_counter() - start
    for conn in connections:
        await conn.close()
    return Load(latencies, seconds, failures)


async def insert_floor(settings: Settings) -> Load:
    """Single-row INSERTs, each its own committed transaction, as the event store's are."""
    table = f"bench_floor_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as db:
        await db.execute(
            f"CREATE TABLE {table} (id uuid PRIMARY KEY, version int, topic text, state bytea)"
        )
    payload = os.urandom(300)
    connections = [
        await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True)
        for _ in range(CONCURRENCY)
    ]
    latencies: list[float] = []
    counter = iter(range(INSERTS))

    async def worker(db: psycopg.AsyncConnection[Any]) -> None:
        for _ in counter:
            start = time.perf_counter()
            await db.execute(
                f"INSERT INTO {table} VALUES (%s, 1, 'bench', %s)",
                [uuid.uuid4(), payload],
            )
            latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker(db) for db in connections))
    seconds = time.perf_counter() - start
    await connections[0].execute(f"DROP TABLE IF EXISTS {table}")
    for db in connections:
        await db.close()
    return Load(latencies, seconds, 0)


async def token_headers(auth_url: str) -> dict[str, str]:
    """A development admin's bearer token, when the stack runs an auth service."""
    from auth.service import DEV_EMAIL, DEV_PASSWORD

    conn = Connection(auth_url)
    try:
        reply = await conn.request(
            "POST", "/auth/login", json_body={"email": DEV_EMAIL, "password": DEV_PASSWORD}
        )
    except OSError:
        return {}
    finally:
        await conn.close()
    if reply.status != 200:
        raise RuntimeError(f"development login failed ({reply.status}): is `make up` running?")
    return {"Authorization": f"Bearer {reply.json()['token']}"}


async def quiesce(settings: Settings, timeout: float = 120.0) -> float:
    """Waits until the directory has applied the newest patient event; returns the wait."""
    start = time.perf_counter()
    async with await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as db:
        newest = await (
            await db.execute(
                "SELECT max(notification_id) FROM carelog_events WHERE topic LIKE %s",
                ["%:Patient.%"],
            )
        ).fetchone()
        while time.perf_counter() - start < timeout:
            applied = await (
                await db.execute(
                    "SELECT position FROM projection_tracking WHERE projection = 'directory'"
                )
            ).fetchone()
            if newest is None or newest[0] is None or (applied and applied[0] >= newest[0]):
                break
            await asyncio.sleep(0.05)
    return time.perf_counter() - start


def ms(value: float) -> str:
    return f"{value:.1f} ms" if value >= 10 else f"{value:.2f} ms"


def main_for(run: Callable[[Settings], Coroutine[Any, Any, list[str]]]) -> None:
    """`python -m bench.<name>`: one benchmark's section on stdout, on the dev stack."""
    settings = Settings.from_env({"CARELOG_ENV": "development", **os.environ})
    print("\n".join(asyncio.run(run(settings))))


def scratch_database(settings: Settings, prefix: str) -> str:
    """A new database beside the stack's, migrated and empty; returns its URL. Nothing of
    the stack reads it: no relay, no consumer."""
    return bootstrap.database.create_database(
        settings.database_url, f"{prefix}_{uuid.uuid4().hex[:8]}"
    )


def drop_database(settings: Settings, url: str) -> None:
    """Drops a scratch database `scratch_database` made."""
    bootstrap.database.drop_database(settings.database_url, urlsplit(url).path.lstrip("/"))
