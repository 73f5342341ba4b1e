"""The outbox relay: publishes billing's outbox to `billing.events`, in order, at least once.

Each change wrote its event to the outbox in the change's own transaction, so
there is no dual write. The relay sends unpublished rows in id order (key = the
account id, so one account's events stay in one partition, in order), waits
until Kafka has acknowledged every one of them, and only then marks them
published. A crash anywhere resends what was not marked; consumers deduplicate
on the envelope's event id. One relay runs at a time: it holds an advisory lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import msgspec
import psycopg
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import Counter
from psycopg import sql

from commands.relay import headers_for
from domain.billing import AGGREGATE_TYPE
from domain.contracts import Envelope, event_id

log = structlog.get_logger(__name__)

PUBLISHED = Counter("carelog_billing_outbox_published_total", "Billing events published")

_encoder = msgspec.json.Encoder()
_LOCK_NAME = "carelog-billing-outbox:"


class OutboxRelay:
    """Follows the outbox and publishes it; `run()` until `stop()`."""

    def __init__(
        self,
        database_url: str,
        producer: AIOKafkaProducer,
        schema: str,
        topic: str,
        batch_size: int = 500,
        idle_sleep: float = 0.02,
    ):
        self.database_url = database_url
        self.producer = producer
        self.schema = schema
        self.topic = topic
        self.batch_size = batch_size
        self.idle_sleep = idle_sleep
        self.last_cycle = time.monotonic()
        self.leader = False
        self._stopping = asyncio.Event()
        s = sql.Identifier(schema)
        self._pending = sql.SQL(
            "SELECT id, aggregate_id, aggregate_version, type, schema_version, payload,"
            " occurred_at, correlation_id FROM {}.outbox WHERE published_at IS NULL"
            " ORDER BY id LIMIT %s"
        ).format(s)
        self._mark = sql.SQL("UPDATE {}.outbox SET published_at = now() WHERE id = ANY(%s)").format(
            s
        )

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.database_url, autocommit=True
                ) as db:
                    await self._lead(db)
                    while not self._stopping.is_set():
                        published = await self.cycle(db)
                        self.last_cycle = time.monotonic()
                        if published == 0:
                            await self._idle()
            except (KafkaError, psycopg.OperationalError) as exc:
                # Nothing unmarked counts as sent: the next cycle sends it again.
                log.warning("billing outbox cycle failed; retrying", error=repr(exc))
                self.leader = False
                await self._idle(1.0)
        log.info("billing outbox relay stopped")

    async def _lead(self, db: psycopg.AsyncConnection[Any]) -> None:
        """Waits until this is the only relay of the schema (the lock dies with the session)."""
        while not self._stopping.is_set():
            row = await (
                await db.execute(
                    "SELECT pg_try_advisory_lock(hashtext(%s))", [_LOCK_NAME + self.schema]
                )
            ).fetchone()
            if row and row[0]:
                self.leader = True
                log.info("billing outbox relay leads", topic=self.topic)
                return
            self.last_cycle = time.monotonic()  # standing by is healthy
            await self._idle(1.0)

    async def _idle(self, seconds: float | None = None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds or self.idle_sleep)

    def stop(self) -> None:
        self._stopping.set()

    async def cycle(self, db: psycopg.AsyncConnection[Any]) -> int:
        """Publishes one batch; returns how many events it published."""
        rows = await (await db.execute(self._pending, [self.batch_size])).fetchall()
        if not rows:
            return 0
        deliveries = []
        for row in rows:
            position, aggregate_id, version, type_, schema_version, payload, at, corr = row
            envelope: Envelope[msgspec.Raw] = Envelope(
                event_id=event_id(aggregate_id, version),
                type=type_,
                schema_version=schema_version,
                aggregate_type=AGGREGATE_TYPE,
                aggregate_id=aggregate_id,
                aggregate_version=version,
                position=position,
                occurred_at=at,
                correlation_id=corr,
                data=msgspec.Raw(payload),
            )
            deliveries.append(
                await self.producer.send(
                    self.topic,
                    value=_encoder.encode(envelope),
                    key=str(aggregate_id).encode(),
                    headers=headers_for(envelope),
                )
            )
        for delivery in deliveries:
            await delivery  # raises if Kafka did not take it: nothing is marked
        await db.execute(self._mark, [[row[0] for row in rows]])
        PUBLISHED.inc(len(rows))
        return len(rows)
