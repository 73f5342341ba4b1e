"""The consumer protocol (runtime.consumers) on FastStream's in-memory Kafka broker.

A recording worker stands in for a projection: it keeps what each `apply` was given
and what it committed. Batches go through `subscribe`'s real batch subscriber (raw
bodies, NACK_ON_ERROR); dead letters are caught by a subscriber on the dead-letter
topic of the same in-memory broker. The real broker's redelivery is proved by
tests/integration.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from types import SimpleNamespace
from typing import Any
from uuid import UUID, uuid4

import msgspec
import psycopg
import psycopg_pool
import pytest
import redis.exceptions
from faststream import BaseMiddleware
from faststream.kafka import KafkaBroker, TestKafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.message import AckStatus, StreamMessage
from prometheus_client import REGISTRY

from domain import contracts
from runtime import consumers
from runtime.consumers import Batch, EventBatchWorker, UnappliableEvent, subscribe

TOPIC = "test.patient.events"
DEAD_LETTERS = "test.patient.events.dead"
GROUP = "test-consumer"
_names = itertools.count()


def registered(patient_id: UUID | None = None, name: str = "Ada Lovelace") -> bytes:
    patient_id = patient_id or uuid4()
    return msgspec.json.encode(
        contracts.envelope(
            contracts.PatientRegisteredV1(
                name=name,
                email=f"p-{patient_id.hex[:12]}@example.org",
                address="12 St James's Square",
                date_of_birth=date(1990, 12, 10),
                registered_date=date(2024, 1, 2),
            ),
            aggregate_id=patient_id,
            aggregate_version=1,
            position=1,
            occurred_at=datetime(2024, 1, 2, 9, 30, tzinfo=UTC),
        )
    )


def removed(patient_id: UUID, version: int = 2) -> bytes:
    return msgspec.json.encode(
        contracts.envelope(
            contracts.PatientRemovedV1(),
            aggregate_id=patient_id,
            aggregate_version=version,
            position=version,
            occurred_at=datetime(2024, 1, 3, tzinfo=UTC),
            correlation_id="req-7",
        )
    )


def event_id(body: bytes) -> UUID:
    return contracts.decode(body)[0].event_id


def with_type(body: bytes, type_: str, version: int) -> bytes:
    """A well-formed envelope of a (type, version) that no contract publishes."""
    wire = msgspec.json.decode(body)
    wire["type"], wire["schemaVersion"] = type_, version
    return msgspec.json.encode(wire)


def without(body: bytes, key: str) -> bytes:
    wire = msgspec.json.decode(body)
    del wire[key]
    return msgspec.json.encode(wire)


class RecordingWorker(EventBatchWorker):
    """Applies by recording: `committed` holds each batch that applied, as event ids."""

    def __init__(self, broker: KafkaBroker, failures: dict[UUID, BaseException] | None = None):
        super().__init__(f"test-{next(_names)}", broker, DEAD_LETTERS)
        self.failures = failures or {}
        """Event id → what applying a batch holding that event raises."""
        self.attempts: list[list[UUID]] = []
        self.committed: list[list[UUID]] = []
        self.payloads: dict[UUID, Any] = {}

    async def apply(self, batch: Batch) -> None:
        ids = [envelope.event_id for envelope, _ in batch]
        self.attempts.append(ids)
        for event in ids:
            if event in self.failures:
                raise self.failures[event]
        self.committed.append(ids)
        self.payloads.update({envelope.event_id: data for envelope, data in batch})

    @property
    def dead_lettered_count(self) -> float:
        value = REGISTRY.get_sample_value(
            "carelog_consumer_dead_lettered_total", {"consumer": self.name}
        )
        return value or 0.0


@dataclass
class Seen:
    """What the in-memory broker delivered: consumed messages, and the dead letters."""

    consumed: list[StreamMessage[Any]] = field(default_factory=list)
    dead: list[tuple[bytes, str]] = field(default_factory=list)

    def batches(self) -> list[StreamMessage[Any]]:
        """The batches the consumer's subscriber was given (a batch's records are a tuple)."""
        return [
            m
            for m in self.consumed
            if isinstance(m.raw_message, tuple) and m.raw_message[0].topic == TOPIC
        ]


@dataclass
class Harness:
    broker: KafkaBroker
    seen: Seen
    pauses: list[float]

    async def deliver(self, *bodies: bytes) -> None:
        """Delivers the bodies to the consumer as one batch, as a poll of Kafka would."""
        await self.broker.publish_batch(*bodies, topic=TOPIC)


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pauses the worker asks for before redelivery, recorded instead of slept."""
    asked: list[float] = []

    async def sleep(seconds: float) -> None:
        asked.append(seconds)

    monkeypatch.setattr(consumers, "asyncio", SimpleNamespace(sleep=sleep))
    return asked


@pytest.fixture
def seen() -> Seen:
    return Seen()


@pytest.fixture
def broker(seen: Seen) -> KafkaBroker:
    class Capture(BaseMiddleware):
        async def consume_scope(self, call_next: Any, msg: StreamMessage[Any]) -> Any:
            if isinstance(msg.raw_message, list):
                # The test broker hands a batch over as a list of records, where a real poll
                # gives a tuple, and KafkaAckableMessage.nack only understands the tuple:
                # given the list it fails (logged and swallowed), leaving the batch unsettled.
                msg.raw_message = tuple(msg.raw_message)
            seen.consumed.append(msg)
            return await call_next(msg)

    kafka = KafkaBroker(middlewares=[Capture])

    @kafka.subscriber(DEAD_LETTERS)
    async def on_dead_letter(message: KafkaMessage) -> None:
        seen.dead.append((message.body, message.headers["error"]))

    return kafka


@asynccontextmanager
async def running(
    broker: KafkaBroker, seen: Seen, pauses: list[float], worker: RecordingWorker
) -> AsyncIterator[Harness]:
    """`worker` subscribed to TOPIC as in production, on the in-memory broker."""
    subscribe(broker, TOPIC, worker, GROUP)
    async with TestKafkaBroker(broker) as test_broker:
        yield Harness(test_broker, seen, pauses)


@pytest.fixture
def worker(broker: KafkaBroker) -> RecordingWorker:
    return RecordingWorker(broker)


@pytest.fixture
async def kafka(
    broker: KafkaBroker, seen: Seen, pauses: list[float], worker: RecordingWorker
) -> AsyncIterator[Harness]:
    async with running(broker, seen, pauses, worker) as started:
        yield started


async def test_decodable_events_are_applied_as_one_batch_and_acknowledged(
    kafka: Harness, worker: RecordingWorker
):
    patient = uuid4()
    bodies = [registered(patient), registered(), removed(patient)]
    await kafka.deliver(*bodies)
    assert worker.committed == [[event_id(b) for b in bodies]]
    assert worker.payloads == {event_id(b): contracts.decode(b)[1] for b in bodies}
    assert kafka.seen.dead == []
    assert [m.committed for m in kafka.seen.batches()] == [AckStatus.ACKED]
    assert kafka.pauses == []


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (lambda: b"\x00not json", "JSON is malformed"),
        (lambda: b"[1, 2, 3]", "Expected `object`, got `array`"),
        (lambda: without(registered(), "eventId"), "missing required field `eventId`"),
        (lambda: with_type(registered(), "PatientRegistered", 99), "('PatientRegistered', 99)"),
        (lambda: with_type(registered(), "PatientAdmitted", 1), "('PatientAdmitted', 1)"),
    ],
    ids=["not-json", "not-an-envelope", "missing-field", "unknown-version", "unknown-type"],
)
async def test_an_undecodable_body_is_dead_lettered_and_the_rest_of_its_batch_applied(
    kafka: Harness, worker: RecordingWorker, bad: Any, error: str
):
    body = bad()
    first, last = registered(), registered()
    await kafka.deliver(first, body, last)
    assert worker.committed == [[event_id(first), event_id(last)]]
    assert len(kafka.seen.dead) == 1
    dead_body, reason = kafka.seen.dead[0]
    assert dead_body == body
    assert reason.startswith("undecodable: ")
    assert error in reason
    assert worker.dead_lettered_count == 1
    assert [m.committed for m in kafka.seen.batches()] == [AckStatus.ACKED]


async def test_a_batch_of_nothing_decodable_is_all_dead_lettered_and_nothing_applied(
    kafka: Harness, worker: RecordingWorker
):
    bodies = [b"{", b"null", without(registered(), "data")]
    await kafka.deliver(*bodies)
    assert worker.attempts == []
    assert [body for body, _ in kafka.seen.dead] == bodies
    assert worker.dead_lettered_count == 3
    assert [m.committed for m in kafka.seen.batches()] == [AckStatus.ACKED]


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (UnappliableEvent("no such patient to change"), "no such patient to change"),
        (
            psycopg.DataError("invalid byte sequence: 0x00 in 'Ada\\x00'"),
            "the database refused it: DataError",
        ),
    ],
    ids=["unappliable", "data-error"],
)
async def test_an_event_that_never_applies_is_dead_lettered_alone_and_its_batch_mates_applied(
    broker: KafkaBroker, seen: Seen, pauses: list[float], failure: Exception, reason: str
):
    bodies = [registered(), registered(name="Bad"), registered()]
    first, bad, last = (event_id(b) for b in bodies)
    worker = RecordingWorker(broker, failures={bad: failure})
    async with running(broker, seen, pauses, worker) as kafka:
        await kafka.deliver(*bodies)

    assert worker.attempts == [[first, bad, last], [first], [bad], [last]]
    assert worker.committed == [[first], [last]]
    assert len(seen.dead) == 1
    dead_body, dead_reason = seen.dead[0]
    assert dead_reason == reason  # a database's message (which may quote the value) is not sent
    dead_envelope, dead_data = contracts.decode(dead_body)
    original_envelope, original_data = contracts.decode(bodies[1])
    assert dead_envelope == original_envelope
    assert dead_data == original_data
    assert worker.dead_lettered_count == 1
    assert [m.committed for m in seen.batches()] == [AckStatus.ACKED]
    assert pauses == []


@pytest.mark.parametrize(
    "failure",
    [
        psycopg.OperationalError("connection refused"),
        psycopg_pool.PoolTimeout("no connection in 30 s"),
        redis.exceptions.ConnectionError("redis is down"),
        redis.exceptions.TimeoutError("redis timed out"),
    ],
    ids=lambda e: type(e).__module__.split(".")[0] + "." + type(e).__name__,
)
async def test_a_transient_failure_is_raised_paced_and_nacked_and_nothing_dead_lettered(
    broker: KafkaBroker, seen: Seen, pauses: list[float], failure: Exception
):
    bodies = [registered(), registered(), b"not json"]
    worker = RecordingWorker(broker, failures={event_id(bodies[1]): failure})
    async with running(broker, seen, pauses, worker) as kafka:
        with pytest.raises(type(failure)) as raised:
            await kafka.deliver(*bodies)
        assert raised.value is failure

    assert worker.attempts == [[event_id(bodies[0]), event_id(bodies[1])]]
    assert worker.committed == []
    assert [body for body, _ in seen.dead] == [b"not json"]  # decoding comes first
    assert [m.committed for m in seen.batches()] == [AckStatus.NACKED]
    assert len(pauses) == 1
    assert pauses[0] > 0


async def test_a_transient_failure_while_applying_one_at_a_time_is_raised_and_nacked(
    broker: KafkaBroker, seen: Seen, pauses: list[float]
):
    bodies = [registered(), registered(), registered()]
    first, bad, flaky = (event_id(b) for b in bodies)
    failures: dict[UUID, BaseException] = {
        bad: UnappliableEvent("never"),
        flaky: psycopg.OperationalError("server closed the connection"),
    }
    worker = RecordingWorker(broker, failures=failures)
    async with running(broker, seen, pauses, worker) as kafka:
        with pytest.raises(psycopg.OperationalError):
            await kafka.deliver(*bodies)

    assert worker.attempts == [[first, bad, flaky], [first], [bad], [flaky]]
    assert worker.committed == [[first]]
    assert [event_id(body) for body, _ in seen.dead] == [bad]
    assert [m.committed for m in seen.batches()] == [AckStatus.NACKED]
    assert len(pauses) == 1


async def test_an_unexpected_error_is_raised_paced_and_nacked_not_dead_lettered(
    broker: KafkaBroker, seen: Seen, pauses: list[float]
):
    body = registered()
    bug = ZeroDivisionError("a bug in the projection")
    worker = RecordingWorker(broker, failures={event_id(body): bug})
    async with running(broker, seen, pauses, worker) as kafka:
        with pytest.raises(ZeroDivisionError):
            await kafka.deliver(body)

    assert worker.attempts == [[event_id(body)]]  # not retried one at a time
    assert seen.dead == []
    assert worker.dead_lettered_count == 0
    assert [m.committed for m in seen.batches()] == [AckStatus.NACKED]
    assert len(pauses) == 1


async def test_a_redelivered_batch_is_applied_once_the_failure_has_passed(
    broker: KafkaBroker, seen: Seen, pauses: list[float]
):
    bodies = [registered(), registered()]
    failures: dict[UUID, BaseException] = {event_id(bodies[0]): psycopg.OperationalError("down")}
    worker = RecordingWorker(broker, failures=failures)
    async with running(broker, seen, pauses, worker) as kafka:
        with pytest.raises(psycopg.OperationalError):
            await kafka.deliver(*bodies)
        failures.clear()
        await kafka.deliver(*bodies)  # what Kafka does after the nack

    assert worker.committed == [[event_id(b) for b in bodies]]
    assert [m.committed for m in seen.batches()] == [AckStatus.NACKED, AckStatus.ACKED]
    assert seen.dead == []


async def test_handle_takes_bodies_directly_and_dead_letters_through_the_broker(
    broker: KafkaBroker, seen: Seen
):
    """`handle` is the protocol without the subscriber: what a poll of the real broker feeds."""
    worker = RecordingWorker(broker)
    good = registered()
    async with TestKafkaBroker(broker):
        await worker.handle([b"", good])
    assert worker.committed == [[event_id(good)]]
    assert [body for body, _ in seen.dead] == [b""]
    assert seen.batches() == []  # nothing went through the consumer's subscriber
