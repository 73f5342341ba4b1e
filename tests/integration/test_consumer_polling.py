"""How a consumer polls Kafka (runtime.consumers), on the real broker.

Idle, a consumer asks the broker to hold its fetch until a record arrives: it fetches a
few times a second, not fifty, and the next event is taken as soon as it arrives. Busy,
the broker gathers records for each fetch, so events still come in batches; flooded, it
gathers longer, and a trickle after the flood does not. The fetches
are counted where the client sends its requests; nothing of Kafka's is faked.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import anyio.to_thread
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.client import AIOKafkaClient
from aiokafka.protocol.fetch import FetchRequest

from domain import contracts
from runtime.consumers import (
    COMMIT_EVERY_S,
    FETCH_MAX_WAIT_MS,
    FLOOD_MAX_WAIT_MS,
    FLOOD_RECORDS,
    IDLE_FETCH_MAX_WAIT_MS,
    Batch,
    EventBatchWorker,
    subscribe,
)
from runtime.kafka import (
    EVENT_PARTITIONS,
    client_options,
    ensure_topics,
    kafka_broker,
    reliable_producer,
)
from runtime.settings import Settings

pytestmark = pytest.mark.integration


class Arrivals(EventBatchWorker):
    """Keeps when each event was applied, and each batch's size."""

    opens_sealed = False

    def __init__(self, settings: Settings, topic: str):
        super().__init__("polling", kafka_broker(settings, "polling"), f"{topic}.dlq")
        self.applied: dict[uuid.UUID, float] = {}
        self.batches: list[int] = []
        self.held: set[uuid.UUID] = set()
        """Events whose batch waits for `release` before it applies."""
        self.release = asyncio.Event()

    async def apply(self, batch: Batch) -> None:
        if any(envelope.event_id in self.held for envelope, _ in batch):
            await self.release.wait()
        now = time.monotonic()
        self.batches.append(len(batch))
        for envelope, _ in batch:
            self.applied[envelope.event_id] = now


def removal() -> tuple[uuid.UUID, bytes, bytes]:
    patient = uuid.uuid4()
    envelope = contracts.envelope(
        contracts.PatientRemovedV1(),
        aggregate_id=patient,
        aggregate_version=2,
        position=2,
        occurred_at=datetime.now(UTC),
    )
    return envelope.event_id, msgspec.json.encode(envelope), str(patient).encode()


async def until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met")
        await asyncio.sleep(0.002)


@asynccontextmanager
async def consuming(settings: Settings) -> AsyncIterator[tuple[Arrivals, AIOKafkaProducer, str]]:
    """A subscribed worker on a topic of its own (ready: it has applied a first event),
    and a producer for that topic."""
    topic = settings.topic(f"polling-{uuid.uuid4().hex[:8]}")
    await ensure_topics(settings, [topic])
    worker = Arrivals(settings, topic)
    broker = kafka_broker(settings, "polling")
    subscribe(broker, topic, worker, f"{topic}-group")
    producer = reliable_producer(settings)
    await producer.start()
    await broker.start()
    try:
        first, body, key = removal()
        await producer.send_and_wait(topic, body, key=key)
        await until(lambda: first in worker.applied)
        yield worker, producer, topic
    finally:
        await broker.stop()
        await producer.stop()


async def offsets(settings: Settings, topic: str) -> tuple[int, int]:
    """The topic's end, and how far its consumer group (`consuming`'s) has committed."""
    consumer = AIOKafkaConsumer(
        **client_options(settings), group_id=f"{topic}-group", enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(EVENT_PARTITIONS)]
        end = sum((await consumer.end_offsets(partitions)).values())
        committed = [await consumer.committed(tp) for tp in partitions]
        return end, sum(c or 0 for c in committed)
    finally:
        await consumer.stop()


OFFSET_COMMIT = 8
"""The Kafka protocol's API key of an offset commit request."""


@pytest.fixture
def commits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """When each offset commit went to the broker."""
    sent: list[float] = []
    send = AIOKafkaClient.send

    def counting(self: AIOKafkaClient, node_id: Any, request: Any, **kwargs: Any) -> Any:
        if getattr(request, "API_KEY", None) == OFFSET_COMMIT:
            sent.append(time.monotonic())
        return send(self, node_id, request, **kwargs)

    monkeypatch.setattr(AIOKafkaClient, "send", counting)
    return sent


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, int]]:
    """When each fetch request went to the broker, and how long it let the broker wait."""
    sent: list[tuple[float, int]] = []
    send = AIOKafkaClient.send

    def counting(self: AIOKafkaClient, node_id: Any, request: Any, **kwargs: Any) -> Any:
        if isinstance(request, FetchRequest):
            sent.append((time.monotonic(), request._max_wait_ms))
        return send(self, node_id, request, **kwargs)

    monkeypatch.setattr(AIOKafkaClient, "send", counting)
    return sent


async def test_an_idle_consumer_fetches_rarely_and_takes_the_next_event_at_once(
    settings: Settings, waits: list[tuple[float, int]]
):
    async with consuming(settings) as (worker, producer, topic):
        await asyncio.sleep(1.0)  # nothing arrives: the consumer is idle
        since = time.monotonic()
        await asyncio.sleep(2.0)
        idle = [t for t, _ in waits if t >= since]
        # Held by the broker up to half a second each; polling every 20 ms is about 100.
        assert len(idle) <= 10, f"{len(idle)} fetches in 2 s of idling"

        waits = []
        for _ in range(10):
            await asyncio.sleep(0.45)  # longer than a poll: each event comes to an idle one
            event, body, key = removal()
            sent = time.monotonic()
            await producer.send_and_wait(topic, body, key=key)
            await until(lambda: event in worker.applied, timeout=5.0)  # noqa: B023
            waits.append(worker.applied[event] - sent)
        # The broker answers the held fetch at once; nothing sleeps in between.
        assert max(waits) < 0.12, [round(w * 1000) for w in waits]


async def test_a_busy_consumer_still_takes_events_in_batches(settings: Settings):
    async with consuming(settings) as (worker, producer, topic):
        await asyncio.sleep(0.5)
        worker.batches.clear()
        events = []
        start = time.monotonic()
        for i in range(300):  # 300 a second for a second, one at a time
            event, body, key = removal()
            events.append(event)
            await producer.send(topic, body, key=key)
            await asyncio.sleep(max(0.0, start + (i + 1) / 300 - time.monotonic()))
        await producer.flush()
        await until(lambda: all(e in worker.applied for e in events))
        # Gathered for up to 50 ms a fetch: about 20 batches. A fetch answered per event
        # would make about one batch per event.
        assert sum(worker.batches) == len(events)
        assert len(worker.batches) <= 120, worker.batches


async def test_a_flooded_consumer_gathers_longer_and_a_trickle_does_not_wait_for_it(
    settings: Settings, waits: list[tuple[float, int]]
):
    async with consuming(settings) as (worker, producer, topic):
        await asyncio.sleep(0.5)
        worker.batches.clear()
        flood = []
        for _ in range(40):  # 2,000 a second for 1.5 s: batches of dozens
            for _ in range(100):
                event, body, key = removal()
                flood.append(event)
                await producer.send(topic, body, key=key)
            await producer.flush()
            await asyncio.sleep(0.05)
        await until(lambda: all(e in worker.applied for e in flood))
        assert FLOOD_MAX_WAIT_MS in {wait for _, wait in waits}
        assert max(worker.batches) >= FLOOD_RECORDS

        await asyncio.sleep(0.5)  # idle again
        since = time.monotonic()
        for _ in range(20):  # a trickle, 40 a second: one at a time
            event, body, key = removal()
            await producer.send_and_wait(topic, body, key=key)
            await until(lambda: event in worker.applied, timeout=5.0)  # noqa: B023
            await asyncio.sleep(0.025)
        trickle = {wait for t, wait in waits if t >= since}
        # The trickle's fetches wait as a busy or an idle consumer's do, not a flooded one's.
        assert FLOOD_MAX_WAIT_MS not in trickle
        assert trickle & {FETCH_MAX_WAIT_MS, IDLE_FETCH_MAX_WAIT_MS}


async def test_a_batch_reaches_the_worker_without_a_thread(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
):
    """The handler's argument is the decoded batch itself: nothing of it is resolved in a
    worker thread (FastStream resolves a `KafkaMessage` parameter there, once a batch)."""
    hand_offs: list[object] = []
    run_sync = anyio.to_thread.run_sync

    async def counting(func: Any, *args: Any, **kwargs: Any) -> Any:
        hand_offs.append(func)
        return await run_sync(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    async with consuming(settings) as (worker, producer, topic):
        hand_offs.clear()
        events = []
        for _ in range(20):
            event, body, key = removal()
            events.append(event)
            await producer.send_and_wait(topic, body, key=key)
        await until(lambda: all(e in worker.applied for e in events))
        assert hand_offs == []


async def test_a_busy_consumer_commits_about_once_a_second_and_everything_when_it_stops(
    settings: Settings, commits: list[float]
):
    async with consuming(settings) as (worker, producer, topic):
        await asyncio.sleep(COMMIT_EVERY_S + 0.2)
        worker.batches.clear()
        commits.clear()
        events = []
        start = time.monotonic()
        for _ in range(30):  # 1,000 a second for 3 s, sent every 100 ms
            for _ in range(100):
                event, body, key = removal()
                events.append(event)
                await producer.send(topic, body, key=key)
            await producer.flush()
            await asyncio.sleep(0.1)
        await until(lambda: all(e in worker.applied for e in events))
        took = time.monotonic() - start
        # A commit a batch would be one per batch: dozens. At most one a second (and one
        # at the start of the flood, the last one having been long before).
        assert len(worker.batches) >= 3 * (took / COMMIT_EVERY_S + 2), worker.batches
        assert len(commits) <= took / COMMIT_EVERY_S + 2, len(commits)
    end, committed = await offsets(settings, topic)
    assert committed == end  # stopping committed what had applied


async def test_an_idle_consumer_commits_its_last_batch_within_the_interval(settings: Settings):
    async with consuming(settings) as (worker, producer, topic):
        event, body, key = removal()
        await producer.send_and_wait(topic, body, key=key)
        await until(lambda: event in worker.applied)
        await asyncio.sleep(COMMIT_EVERY_S + 0.5)  # no other batch comes: a timer commits
        end, committed = await offsets(settings, topic)
        assert committed == end


async def test_nothing_is_committed_past_a_batch_that_has_not_applied(settings: Settings):
    async with consuming(settings) as (worker, producer, topic):
        await asyncio.sleep(COMMIT_EVERY_S + 0.2)
        before, _ = await offsets(settings, topic)
        applied = []
        for _ in range(2):  # the first commits at once; the second's commit waits its turn
            event, body, key = removal()
            applied.append(event)
            await producer.send_and_wait(topic, body, key=key)
            await until(lambda: event in worker.applied)  # noqa: B023
        held, body, key = removal()
        worker.held.add(held)
        await producer.send_and_wait(topic, body, key=key)
        await asyncio.sleep(COMMIT_EVERY_S + 0.5)  # the held batch is in hand meanwhile
        end, committed = await offsets(settings, topic)
        assert (end, committed) == (before + 3, before + 2)
        worker.release.set()
        await until(lambda: held in worker.applied)
    end, committed = await offsets(settings, topic)
    assert committed == end
