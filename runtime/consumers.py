"""The protocol every consumer of published events follows (projections, billing).

A batch is decoded against the published contracts; what cannot be decoded is
dead-lettered. The rest is applied in one transaction and acknowledged only
after it commits (AckPolicy.NACK_ON_ERROR), so a crash or a transient failure
redelivers it; consumers apply idempotently, so redelivery changes nothing
twice. If an event in the batch can never apply, the batch is applied one event
at a time so that only that event is dead-lettered. Nothing is skipped silently.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
import weakref
from collections.abc import Mapping, Sequence
from itertools import chain
from typing import Any

import msgspec
import psycopg
import psycopg_pool
import redis.exceptions
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.errors import IllegalStateError, KafkaError
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from faststream.kafka.subscriber.usecase import BatchSubscriber
from prometheus_client import Counter

from domain import contracts
from runtime import tracing
from runtime.crypto import Keyring, open_payloads
from runtime.kafka import Records, raw_records

log = structlog.get_logger(__name__)

DEAD_LETTERED = Counter(
    "carelog_consumer_dead_lettered_total", "Events set aside on a dead-letter topic", ["consumer"]
)

TRANSIENT = (
    psycopg.OperationalError,
    psycopg_pool.PoolTimeout,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
"""Failures worth redelivering: the batch comes back once the dependency does."""

Batch = list[tuple[contracts.Envelope[Any], Any]]

FETCH_MIN_BYTES = 64 * 1024
FETCH_MAX_WAIT_MS = 20
"""Busy: the broker answers a fetch once this much is waiting or the wait is up."""
FLOOD_MIN_BYTES = 256 * 1024
FLOOD_MAX_WAIT_MS = 50
"""Flooded (a batch of FLOOD_RECORDS or more came): the broker gathers longer. A batch costs
a consumer a fetch, a transaction and an offset commit whatever its size; at 700
registrations a second, batches gathered for 50 ms rather than 20 cut what the consumers
spend per registration by about a seventh (docs/benchmarks.md), and an event waits at
most 30 ms more, behind dozens of others. A trickle keeps the shorter wait."""
FLOOD_RECORDS = 32
COMMIT_EVERY_S = 1.0
"""A consumer commits its offsets to Kafka at most this often (see `_Commits`)."""
IDLE_FETCH_MAX_WAIT_MS = 500
"""Idle: the broker holds a fetch this long unless a record arrives, which it answers at once."""
POLL_TIMEOUT_MS = 200
"""How long one poll waits for records; a poll that finds none makes the consumer idle."""
BUSY_WITHIN_S = 2 * FETCH_MAX_WAIT_MS / 1000
"""Records that came this soon after the consumer was ready for them mean more are coming:
gathering them pays. Events further apart come alone either way, and a held fetch costs
less than fifty short ones. Once busy, a consumer stays so until a poll finds nothing (a
late batch on a loaded machine does not break the batching)."""


class UnappliableEvent(Exception):
    """An event a consumer can never apply; it goes to the dead-letter topic."""


NEVER_APPLIES = (UnappliableEvent, psycopg.DataError)
"""Failures that no retry can mend: the data itself is wrong (e.g. text PostgreSQL refuses)."""


class EventBatchWorker(abc.ABC):
    """Decodes, applies and dead-letters batches of published events."""

    keyring: Keyring | None = None
    """Opens sealed personal fields (set by `subscribe`); see `opened`."""
    opens_sealed = True
    """False: the consumer keeps sealed payloads sealed (and opens them when it reads, or
    never reads their personal fields); nothing is decrypted and no key is read."""
    reads: frozenset[str] | None = None
    """The personal fields the consumer uses (None: all). Sealed payloads still open to
    their clear version, or `contracts.Unreadable` once the patient is erased, but the
    fields not named stay sealed: decrypting them would be work thrown away."""

    def __init__(self, name: str, broker: KafkaBroker, dead_letter_topic: str):
        self.name = name
        self.broker = broker
        self.dead_letter_topic = dead_letter_topic

    @abc.abstractmethod
    async def apply(self, batch: Batch) -> None:
        """Applies decoded events in one transaction; raises UnappliableEvent or fails."""

    async def handle(self, bodies: list[bytes], headers: Sequence[Mapping[str, Any]] = ()) -> None:
        """Applies one batch; `headers` (each message's Kafka headers) join its span to the
        publish spans that sent it."""
        decoded: Batch = []
        for body in bodies:
            try:
                decoded.append(contracts.decode(body))
            except (msgspec.DecodeError, msgspec.ValidationError, KeyError) as exc:
                await self.dead_letter(body, f"undecodable: {exc}")
        if not decoded:
            return
        self.forget_erased(decoded)
        # Only a batch with something to open pays for the thread (keys are read from
        # PostgreSQL with a blocking driver).
        if self.opens_sealed and any(type(data) in contracts.SEALED for _, data in decoded):
            decoded = await asyncio.to_thread(self.opened, decoded)
        # Log lines about the batch name the requests that caused its events.
        causes = sorted({e.correlation_id for e, _ in decoded if e.correlation_id})
        with structlog.contextvars.bound_contextvars(correlation_id=" ".join(causes) or None):
            if not tracing.enabled():
                await self._handle(decoded)
                return
            with tracing.consumer_span(
                f"consume {self.name}",
                headers,
                {
                    "carelog.consumer": self.name,
                    "carelog.events": len(decoded),
                    "carelog.event_types": sorted({e.type for e, _ in decoded}),
                    "carelog.position.first": decoded[0][0].position,
                    "carelog.position.last": decoded[-1][0].position,
                    "carelog.correlation_ids": causes,
                },
            ) as span:
                try:
                    await self._handle(decoded)
                except BaseException as exc:
                    tracing.mark_failed(span, exc)
                    raise

    def forget_erased(self, decoded: Batch) -> None:
        """An erasure in the batch drops its patient's key before anything is opened, by
        every consumer that holds a keyring, whether or not it opens this batch."""
        if self.keyring is None:
            return
        for envelope, data in decoded:
            if isinstance(data, contracts.PatientErasedV1):
                self.keyring.forget(envelope.aggregate_id)

    def opened(self, decoded: Batch) -> Batch:
        """The batch with its sealed payloads opened: consumers see personal fields in the
        clear (those in `reads`), or `contracts.Unreadable` for an erased patient (and must
        keep nothing personal of theirs). The batch's keys are read in one round trip;
        `handle` has already had its erasures forget their keys (`forget_erased`)."""
        payloads = open_payloads(self.keyring, (data for _, data in decoded), self.reads)
        return [(envelope, data) for (envelope, _), data in zip(decoded, payloads, strict=True)]

    async def _handle(self, decoded: Batch) -> None:
        try:
            await self._apply(decoded)
        except TRANSIENT as exc:
            log.warning("batch not applied; redelivering", consumer=self.name, error=repr(exc))
            await asyncio.sleep(1.0)
            raise
        except Exception:
            # Unexpected: logged by the broker with its traceback, then redelivered,
            # paced so that a bug cannot spin the consumer.
            await asyncio.sleep(1.0)
            raise

    async def _apply(self, decoded: Batch) -> None:
        try:
            await self.apply(decoded)
        except NEVER_APPLIES:
            for one in decoded:
                with structlog.contextvars.bound_contextvars(
                    correlation_id=one[0].correlation_id, event_id=str(one[0].event_id)
                ):
                    try:
                        await self.apply([one])
                    except NEVER_APPLIES as exc:
                        await self.dead_letter(msgspec.json.encode(one[0]), _reason(exc))

    async def dead_letter(self, body: bytes, reason: str) -> None:
        DEAD_LETTERED.labels(self.name).inc()
        log.error(
            "event dead-lettered",
            consumer=self.name,
            reason=reason[:200],
            topic=self.dead_letter_topic,
        )
        await self.broker.publish(
            body, topic=self.dead_letter_topic, headers={"error": reason[:500]}
        )


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnappliableEvent):
        return str(exc)
    # A database's message may quote the offending value: name only the kind of error.
    return f"the database refused it: {type(exc).__name__}"


class _Batches(BatchSubscriber):
    """FastStream's batch subscriber, polling so that an idle consumer costs next to nothing
    and an event after a quiet spell is taken at once, while a busy one still gets batches.

    - Busy (from records that came within BUSY_WITHIN_S of polling for them until a poll
      finds none): the broker gathers records for up to FETCH_MAX_WAIT_MS (or
      FETCH_MIN_BYTES) before it answers a fetch, so each consumer fetches a few dozen
      times a second, not once per event. That is what the subscription is made with.
    - Flooded (from a batch of FLOOD_RECORDS or more until one of fewer): the broker
      gathers for up to FLOOD_MAX_WAIT_MS (or FLOOD_MIN_BYTES): fewer, larger batches
      when each costs most.
    - Idle (from a poll that found none in POLL_TIMEOUT_MS): the broker holds each fetch
      until a record arrives, which it answers at once, or for IDLE_FETCH_MAX_WAIT_MS:
      two fetches a second instead of fifty, and no added wait for the next event.

    The client has no public way to change a running consumer's fetch sizes: they are set
    on its fetcher, which reads them for each fetch it sends (`_fetch_as`; a test holds the
    client to it). Without that fetcher the consumer just stays as it was made (busy).

    FastStream's own poll also sleeps as long again after a poll that found nothing, and a
    record arriving meanwhile waits out the sleep; this one polls again at once.
    """

    __slots__ = ()

    async def get_msg(self, consumer: AIOKafkaConsumer) -> tuple[ConsumerRecord[Any, Any], ...]:
        if not isinstance(consumer.commit, _Commits):
            _Commits.install(consumer)
        asked = time.monotonic()
        ready = _ready_since.setdefault(consumer, asked)
        records = await consumer.getmany(
            timeout_ms=self.batch_timeout_ms, max_records=self.max_records
        )
        now = time.monotonic()
        if records:
            del _ready_since[consumer]
            got = tuple(chain.from_iterable(records.values()))
            if len(got) >= FLOOD_RECORDS:
                _fetch_as(consumer, FLOOD_MIN_BYTES, FLOOD_MAX_WAIT_MS)
            elif now - ready < BUSY_WITHIN_S or _busy(consumer):
                _fetch_as(consumer, FETCH_MIN_BYTES, FETCH_MAX_WAIT_MS)
            else:
                _fetch_as(consumer, 1, IDLE_FETCH_MAX_WAIT_MS)
            return got
        _fetch_as(consumer, 1, IDLE_FETCH_MAX_WAIT_MS)
        if now - asked < self.batch_timeout_ms / 2000:
            # Only a stopping consumer answers before its timeout: never spin.
            await asyncio.sleep(self.batch_timeout_ms / 1000)
        return ()


class _Commits:
    """A consumer's offset commits, at most one every COMMIT_EVERY_S.

    A batch is acknowledged (its offsets committed) once it has applied. Committed after
    every batch, a busy stack's consumers sent the broker nearly as many offset commits as
    fetches: a third of its requests, and about two fifths of the time it spent handling
    requests. Instead the
    consumer's positions after an applied batch are kept, and committed once the interval
    is up, by the next acknowledgement or by a timer; and when the consumer stops. What a
    crash (or a rebalance) leaves uncommitted is delivered again, at most a second's
    worth, and applies as a redelivery does: changing nothing twice. Nothing is committed
    that has not applied: the positions kept are those after the last applied batch, not
    the client's positions of the moment, which run ahead to the batch in hand.

    Installed as the consumer's `commit` (what FastStream's acknowledgement calls) and
    wraps its `stop`."""

    def __init__(self, consumer: AIOKafkaConsumer):
        self.consumer = consumer
        self.commit_now = consumer.commit
        self.stop_now = consumer.stop
        self.last = 0.0
        self.kept: dict[Any, int] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.flushing: asyncio.Task[None] | None = None

    @classmethod
    def install(cls, consumer: AIOKafkaConsumer) -> None:
        commits = cls(consumer)
        consumer.commit = commits
        consumer.stop = commits.stop

    async def __call__(self, offsets: Any = None) -> None:
        if offsets is not None:
            await self.commit_now(offsets)
            return
        assignment = getattr(self.consumer._subscription.subscription, "assignment", None)
        if assignment is None:
            await self.commit_now()  # the client's own error
            return
        self.kept = assignment.all_consumed_offsets()
        wait = self.last + COMMIT_EVERY_S - time.monotonic()
        if wait <= 0:
            await self.flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(wait, self._due)

    def _due(self) -> None:
        self.timer = None
        self.flushing = asyncio.create_task(self.flush())

    async def flush(self) -> None:
        """Commits the positions kept, if any."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        offsets, self.kept = self.kept, None
        if not offsets:
            return
        self.last = time.monotonic()
        try:
            await self.commit_now(offsets)
        except (KafkaError, IllegalStateError) as exc:
            # A rebalance took the partitions (their new owner starts from the last commit
            # and applies the rest again), or the broker is away: the next commit catches up.
            log.info("offsets not committed; their events come again", error=repr(exc))

    async def stop(self) -> None:
        with contextlib.suppress(Exception):  # stopping regardless
            await self.flush()
        await self.stop_now()


_ready_since: weakref.WeakKeyDictionary[AIOKafkaConsumer, float] = weakref.WeakKeyDictionary()
"""When each consumer began polling for its next records (its first poll since the last)."""


def _busy(consumer: AIOKafkaConsumer) -> bool:
    fetcher = getattr(consumer, "_fetcher", None)
    wait = getattr(fetcher, "_fetch_max_wait_ms", FETCH_MAX_WAIT_MS)
    return wait in (FETCH_MAX_WAIT_MS, FLOOD_MAX_WAIT_MS)


def _fetch_as(consumer: AIOKafkaConsumer, min_bytes: int, max_wait_ms: int) -> None:
    """Sets the fetch sizes of the consumer's next fetches (see `_Batches`)."""
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is None or not hasattr(fetcher, "_fetch_max_wait_ms"):
        return
    fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms = min_bytes, max_wait_ms


def subscribe(
    broker: KafkaBroker,
    topic: str | Sequence[str],
    worker: EventBatchWorker,
    group: str,
    keyring: Keyring | None = None,
) -> None:
    """Feeds batches of `topic` (or topics) to the worker, as consumer group `group`, from
    the start; `keyring` opens their sealed personal fields."""
    topics = [topic] if isinstance(topic, str) else list(topic)
    if keyring is not None:
        worker.keyring = keyring

    subscriber = broker.subscriber(
        *topics,
        group_id=group,
        auto_offset_reset="earliest",
        batch=True,
        max_records=500,
        batch_timeout_ms=POLL_TIMEOUT_MS,
        # As when busy; idle, the subscriber asks for long polls (see `_Batches`).
        fetch_min_bytes=FETCH_MIN_BYTES,
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=raw_records,
    )
    # The same object, polling its own way (the subclass adds no state).
    subscriber.__class__ = _Batches

    @subscriber
    async def on_events(records: Any) -> None:
        batch: Records = records
        await worker.handle(batch.bodies, batch.headers)
