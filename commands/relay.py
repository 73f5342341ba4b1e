"""The relay's source: the event store's global log, read in order from a recorded position.

The store is the outbox. The one publisher (`runtime.publisher`) reads the
notifications after the relay's recorded position, publishes each public event,
awaits every acknowledgement and only then records the new position here. A
crash anywhere resends from the last recorded position; consumers drop what
they have already applied.

With nothing to publish, the relay waits on the store's own announcement: every
insert into the store notifies the `carelog_events` channel (see the store's
migration), which the relay LISTENs to. It looks again at least every WAIT_SECONDS.
"""

from __future__ import annotations

from typing import Any

import anyio
import psycopg
from eventsourcing.utils import resolve_topic
from prometheus_client import Gauge

from commands.store import EventStore
from domain.contracts import CONTRACTS, envelope_for
from runtime.publisher import Batch, Outgoing

POSITION = Gauge("carelog_publisher_position", "Last position a publisher recorded", ["publisher"])

WAIT_SECONDS = 1.0
"""Longest the relay waits for an announcement before reading the store anyway."""

_public: dict[str, bool] = {}


def published(topic: str) -> bool:
    """Whether events stored under `topic` are published: others (an email claim's) are
    not even decoded. The topic resolves as the store's mapper resolves it (so a class
    stored under an older topic still counts), once per topic."""
    known = _public.get(topic)
    if known is None:
        known = _public[topic] = resolve_topic(topic) in CONTRACTS
    return known


class EventStoreLog:
    """The store's notifications after the recorded position, as events to publish."""

    def __init__(
        self, store: EventStore, database_url: str, topic_prefix: str = "", name: str = "kafka"
    ):
        self.store = store
        self.database_url = database_url
        self.topic_prefix = topic_prefix
        self.name = name
        self.position = 0
        self._db: psycopg.AsyncConnection[Any] | None = None
        self._listening: psycopg.AsyncConnection[Any] | None = None

    @property
    def topics(self) -> list[str]:
        return sorted({self.topic_prefix + c.stream for c in CONTRACTS.values()})

    async def open(self) -> None:
        self._listening = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
        await self._listening.execute(f'LISTEN "{self.store.events_table}"')
        self._db = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
        row = await (
            await self._db.execute(
                "SELECT position FROM relay_positions WHERE relay = %s", [self.name]
            )
        ).fetchone()
        self.position = row[0] if row else 0

    async def close(self) -> None:
        for conn in (self._db, self._listening):
            if conn is not None:
                await conn.close()
        self._db = self._listening = None

    async def wait(self) -> None:
        """Returns at the store's next insert (or one already announced), or after a while."""
        assert self._listening is not None
        async for _ in self._listening.notifies(timeout=WAIT_SECONDS, stop_after=1):
            break

    async def read(self, limit: int) -> Batch:
        start = self.position + 1
        notifications = await anyio.to_thread.run_sync(
            lambda: self.store.recorder.select_notifications(start, limit)
        )
        events = []
        for notification in notifications:
            if not published(notification.topic):
                continue  # an internal event, such as an email claim
            # Personal fields stay sealed: Kafka's copies are erased with the patient's key.
            event = self.store.sealed_mapper.to_domain_event(notification)
            envelope = envelope_for(event, notification.id)
            if envelope is None:
                continue  # an internal event, such as an email claim
            events.append(Outgoing(self.topic_prefix + CONTRACTS[type(event)].stream, envelope))
        mark = notifications[-1].id if notifications else self.position
        return Batch(events, mark, len(notifications))

    async def record(self, mark: int) -> None:
        assert self._db is not None
        await self._db.execute(
            "INSERT INTO relay_positions (relay, position) VALUES (%s, %s) "
            "ON CONFLICT (relay) DO UPDATE SET position = EXCLUDED.position, updated_at = now()",
            [self.name, mark],
        )
        self.position = mark
        POSITION.labels(self.name).set(mark)

    async def backlog(self) -> int:
        newest = await anyio.to_thread.run_sync(self.store.recorder.max_notification_id)
        return max(0, (newest or 0) - self.position)
