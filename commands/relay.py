"""The relay: publishes the event store's global log to Kafka, in order, at least once.

The store is the outbox. The relay reads notifications after its recorded
position, publishes each public event (key = aggregate id, so one aggregate's
events stay in one partition, in order), waits until Kafka has acknowledged all
of them, and only then records the new position. A crash anywhere resends from
the last recorded position; consumers drop what they have already applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Sequence
from typing import Any

import anyio
import msgspec
import psycopg
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from eventsourcing.persistence import Notification
from prometheus_client import Counter, Gauge

from commands.store import EventStore
from domain.contracts import CONTRACTS, Envelope, envelope_for
from runtime.http import serve_health
from runtime.kafka import ensure_topics, reliable_producer, wait_for_kafka
from runtime.settings import Settings

log = structlog.get_logger(__name__)

PUBLISHED = Counter("carelog_relay_published_total", "Events published to Kafka", ["topic"])
POSITION = Gauge("carelog_relay_position", "Last global position the relay has published")
LAG = Gauge("carelog_relay_lag_events", "Events in the store not yet published")

_encoder = msgspec.json.Encoder()

_SCHEMA = """
CREATE TABLE IF NOT EXISTS relay_positions (
    relay text PRIMARY KEY,
    position bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""


def headers_for(envelope: Envelope[Any]) -> list[tuple[str, bytes]]:
    """The envelope's facts as Kafka headers, for consumers that route without decoding."""
    pairs = {
        "event-type": envelope.type,
        "schema-version": str(envelope.schema_version),
        "aggregate-type": envelope.aggregate_type,
        "aggregate-id": str(envelope.aggregate_id),
        "aggregate-version": str(envelope.aggregate_version),
        "position": str(envelope.position),
        "occurred-at": envelope.occurred_at.isoformat(),
        "event-id": str(envelope.event_id),
        "content-type": "application/json",
    }
    if envelope.correlation_id:
        pairs["correlation-id"] = envelope.correlation_id
    return [(k, v.encode()) for k, v in pairs.items()]


class Relay:
    """Follows the store's log and publishes it; `run()` until `stop()`."""

    def __init__(
        self,
        store: EventStore,
        producer: AIOKafkaProducer,
        database_url: str,
        topic_prefix: str = "",
        name: str = "kafka",
        batch_size: int = 500,
        idle_sleep: float = 0.02,
    ):
        self.store = store
        self.producer = producer
        self.database_url = database_url
        self.topic_prefix = topic_prefix
        self.name = name
        self.batch_size = batch_size
        self.idle_sleep = idle_sleep
        self.position = 0
        self.last_cycle = 0.0
        self._stopping = asyncio.Event()

    @property
    def topics(self) -> list[str]:
        return sorted({self.topic_prefix + c.stream for c in CONTRACTS.values()})

    async def load_position(self) -> int:
        async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True) as db:
            await db.execute(_SCHEMA)
            row = await (
                await db.execute(
                    "SELECT position FROM relay_positions WHERE relay = %s", [self.name]
                )
            ).fetchone()
        self.position = row[0] if row else 0
        POSITION.set(self.position)
        return self.position

    async def run(self) -> None:
        await self.load_position()
        log.info("relay started", position=self.position, topics=self.topics)
        while not self._stopping.is_set():
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.database_url, autocommit=True
                ) as db:
                    while not self._stopping.is_set():
                        published = await self.cycle(db)
                        self.last_cycle = time.monotonic()
                        if published == 0:
                            await self._idle()
            except (KafkaError, psycopg.OperationalError) as exc:
                # Nothing past the recorded position counts as sent: retry from there.
                log.warning("relay cycle failed; retrying", error=repr(exc), position=self.position)
                await asyncio.sleep(1.0)
        log.info("relay stopped", position=self.position)

    async def _idle(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), self.idle_sleep)

    def stop(self) -> None:
        self._stopping.set()

    async def cycle(self, db: psycopg.AsyncConnection[Any]) -> int:
        """Publishes one batch; returns how many notifications it moved past."""
        start = self.position + 1
        notifications: Sequence[Notification] = await anyio.to_thread.run_sync(
            lambda: self.store.recorder.select_notifications(start, self.batch_size)
        )
        if not notifications:
            await self._measure_lag()
            return 0
        pending = []
        for notification in notifications:
            event = self.store.mapper.to_domain_event(notification)
            contract = CONTRACTS.get(type(event))
            envelope = envelope_for(event, notification.id)
            if contract is None or envelope is None:
                continue  # an internal event, such as an email claim
            topic = self.topic_prefix + contract.stream
            pending.append(
                (
                    topic,
                    await self.producer.send(
                        topic,
                        value=_encoder.encode(envelope),
                        key=str(envelope.aggregate_id).encode(),
                        headers=headers_for(envelope),
                    ),
                )
            )
        for topic, delivery in pending:
            await delivery  # raises if Kafka did not take it: the position is not advanced
            PUBLISHED.labels(topic).inc()
        last = notifications[-1].id
        await db.execute(
            "INSERT INTO relay_positions (relay, position) VALUES (%s, %s) "
            "ON CONFLICT (relay) DO UPDATE SET position = EXCLUDED.position, updated_at = now()",
            [self.name, last],
        )
        self.position = last
        POSITION.set(last)
        return len(notifications)

    async def _measure_lag(self) -> None:
        newest = await anyio.to_thread.run_sync(self.store.recorder.max_notification_id)
        LAG.set(max(0, (newest or 0) - self.position))


async def run_relay(settings: Settings) -> None:
    """Runs the relay until SIGTERM or SIGINT, with health and metrics on its port."""
    store = await anyio.to_thread.run_sync(lambda: EventStore(settings.database_url, pool_size=2))
    await wait_for_kafka(settings.kafka_bootstrap)
    producer = reliable_producer(settings.kafka_bootstrap)
    await producer.start()
    relay = Relay(store, producer, settings.database_url, topic_prefix=settings.topic_prefix)
    await ensure_topics(settings.kafka_bootstrap, relay.topics)

    async def database() -> None:
        await anyio.to_thread.run_sync(store.recorder.max_notification_id)

    async def kafka() -> None:
        await producer.client.fetch_all_metadata()

    async def following() -> None:
        if time.monotonic() - relay.last_cycle > 10:
            raise TimeoutError("no relay cycle completed in the last 10 s")

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.stop)
    server = await serve_health(
        {"database": database, "kafka": kafka, "following": following},
        settings.http_host,
        settings.ports["relay"],
    )
    try:
        await relay.run()
    finally:
        await server.stop()
        await producer.stop()
        store.close()
