"""Billing's outbox as a source for the one publisher (`runtime.publisher`).

Each change wrote its event to the outbox in the change's own transaction, so
there is no dual write. The publisher reads unpublished rows in id order, sends
them, awaits every acknowledgement and only then marks them published here. A
crash anywhere resends what was not marked; consumers deduplicate on the
envelope's event id. One process publishes at a time: it holds an advisory lock.

With nothing to publish, the publisher waits for the outbox's own announcement: every
insert into it notifies the `carelog_billing_outbox` channel at commit (see its
migration), which this LISTENs to. It looks again at least every WAIT_SECONDS.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import psycopg
import structlog
from psycopg import sql

from domain.contracts import BY_TYPE, envelope
from runtime.publisher import Batch, Outgoing

log = structlog.get_logger(__name__)

_LOCK_NAME = "carelog-billing-outbox:"
CHANNEL = "carelog_billing_outbox"

WAIT_SECONDS = 1.0
"""Longest the publisher waits for an announcement before reading the outbox anyway."""


class BillingOutbox:
    """Unpublished outbox rows, in order, as events to publish."""

    def __init__(self, database_url: str, schema: str, topic: str):
        self.database_url = database_url
        self.schema = schema
        self.topic = topic
        self.name = f"billing-outbox:{schema}"
        self.leader = False
        self._db: psycopg.AsyncConnection[Any] | None = None
        self._listening: psycopg.AsyncConnection[Any] | None = None
        s = sql.Identifier(schema)
        self._pending = sql.SQL(
            "SELECT id, aggregate_id, aggregate_version, type, schema_version, payload,"
            " occurred_at, correlation_id, actor_id, actor_role"
            " FROM {}.outbox WHERE published_at IS NULL"
            " ORDER BY id LIMIT %s"
        ).format(s)
        self._mark = sql.SQL("UPDATE {}.outbox SET published_at = now() WHERE id = ANY(%s)").format(
            s
        )
        self._backlog = sql.SQL("SELECT count(*) FROM {}.outbox WHERE published_at IS NULL").format(
            s
        )

    async def open(self) -> None:
        """Connects, then waits until this is the only publisher of the schema's outbox."""
        self.leader = False
        # Listening before the first read: an insert committed after it is announced.
        self._listening = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
        await self._listening.execute(f'LISTEN "{CHANNEL}"')
        self._db = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
        while True:  # the lock dies with the session
            row = await (
                await self._db.execute(
                    "SELECT pg_try_advisory_lock(hashtext(%s))", [_LOCK_NAME + self.schema]
                )
            ).fetchone()
            if row and row[0]:
                self.leader = True
                log.info("billing outbox publisher leads", topic=self.topic)
                return
            await asyncio.sleep(1.0)

    async def wait(self) -> None:
        """Returns at the outbox's next insert (or one already announced), or after a while."""
        assert self._listening is not None
        async for _ in self._listening.notifies(timeout=WAIT_SECONDS, stop_after=1):
            break

    async def close(self) -> None:
        self.leader = False
        for conn in (self._db, self._listening):
            if conn is not None:
                await conn.close()
        self._db = self._listening = None

    async def read(self, limit: int) -> Batch:
        assert self._db is not None
        rows = await (await self._db.execute(self._pending, [limit])).fetchall()
        events = []
        for row in rows:
            position, aggregate_id, version, type_, schema_version, payload, at, corr = row[:8]
            data = msgspec.json.decode(payload, type=BY_TYPE[(type_, schema_version)].payload)
            events.append(
                Outgoing(
                    self.topic,
                    envelope(
                        data,
                        aggregate_id=aggregate_id,
                        aggregate_version=version,
                        position=position,
                        occurred_at=at,
                        correlation_id=corr,
                        actor_id=row[8],
                        actor_role=row[9],
                    ),
                )
            )
        return Batch(events, [row[0] for row in rows], len(rows))

    async def record(self, mark: list[int]) -> None:
        assert self._db is not None
        await self._db.execute(self._mark, [mark])

    async def backlog(self) -> int:
        assert self._db is not None
        row = await (await self._db.execute(self._backlog)).fetchone()
        return int(row[0]) if row else 0
