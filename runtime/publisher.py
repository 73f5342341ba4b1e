"""The one ordered, at-least-once publisher: an outbox source → Kafka.

Every process that publishes events runs this loop over its own `Source`: the
event store's global log (the relay) or billing's outbox table. Each cycle reads
the next batch in order, sends every message (key = aggregate id, so one
aggregate's events stay in one partition, in order), awaits every
acknowledgement, and only then records how far it got. A crash anywhere resends
from the last record; consumers drop what they have already applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import psycopg
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Gauge

from domain.contracts import Envelope
from runtime import tracing

log = structlog.get_logger(__name__)

# Every publisher's series carry its source's name (`kafka` for the relay,
# `billing-outbox:<service>` for billing's outbox); a gauge only one source can fill
# (the relay's position) is that source's own, so no process exports another's shape.
PUBLISHED = Counter(
    "carelog_publisher_published_total", "Events published to Kafka", ["publisher", "topic"]
)
LAG = Gauge("carelog_publisher_lag_events", "Events in a source not yet published", ["publisher"])

_encoder = msgspec.json.Encoder()

GATHER_FROM = 16
GATHER_S = 0.02
"""After a cycle that moved GATHER_FROM entries or more (but not a whole batch: a source
that far behind is read again at once), the publisher waits GATHER_S before it reads
again, so that a busy source is sent in fewer, larger batches. A cycle costs a read, a
produce request and a record whatever its size; at 900 registrations a second, cycles of
about twenty events each made the broker's produce requests its costliest. An event
waits at most GATHER_S more, and only while dozens a second come; one alone, after a
quiet spell, goes at once."""


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
    if envelope.actor_id:
        pairs["actor-id"] = envelope.actor_id
    if envelope.actor_role:
        pairs["actor-role"] = envelope.actor_role
    return [(k, v.encode()) for k, v in pairs.items()]


@dataclass(frozen=True)
class Outgoing:
    """One event to publish, on its topic."""

    topic: str
    envelope: Envelope[Any]


@dataclass(frozen=True)
class Batch:
    """What a source read: the events to send and the mark to record once all are acked."""

    events: Sequence[Outgoing]
    mark: Any
    """Source-specific: a position, or the ids to mark published; None when nothing was read."""
    size: int
    """How many source entries the batch moves past (internal ones included)."""


class Source(Protocol):
    """An ordered outbox: read the next batch, record it once Kafka has it."""

    name: str

    async def open(self) -> None:
        """Connects and waits until this process may publish (e.g. a leader lock)."""

    async def read(self, limit: int) -> Batch: ...

    async def record(self, mark: Any) -> None: ...

    async def backlog(self) -> int:
        """Entries not yet published (for the lag gauge)."""

    async def wait(self) -> None:
        """Returns when there may be more to read (or after a while: the caller reads again)."""

    async def close(self) -> None: ...


class Publisher:
    """Runs a source's publish loop until `stop()`; `last_cycle` tells readiness."""

    def __init__(
        self,
        source: Source,
        producer: AIOKafkaProducer,
        batch_size: int = 500,
    ):
        self.source = source
        self.producer = producer
        self.batch_size = batch_size
        self.last_cycle = time.monotonic()
        self._stopping = asyncio.Event()
        self._gauged = 0.0

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        name = self.source.name
        while not self._stopping.is_set():
            try:
                if not await self._opened():
                    break
                while not self._stopping.is_set():
                    moved = await self.cycle()
                    self.last_cycle = time.monotonic()
                    if moved == 0:
                        if self.last_cycle - self._gauged >= 1.0:
                            LAG.labels(name).set(await self.source.backlog())
                            self._gauged = self.last_cycle
                        await self._until_more()
                    elif GATHER_FROM <= moved < self.batch_size:
                        await self._idle(GATHER_S)
            except (KafkaError, psycopg.OperationalError, OSError) as exc:
                # Nothing past the last record counts as sent: the next cycle resends it.
                log.warning("publish cycle failed; retrying", publisher=name, error=repr(exc))
                await self._idle(1.0)
            finally:
                await self.source.close()
        log.info("publisher stopped", publisher=name)

    async def _opened(self) -> bool:
        """Opens the source (which may wait for a leader lock); False if stopped meanwhile."""
        opening = asyncio.ensure_future(self.source.open())
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({opening, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not opening.done():
            opening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await opening
            return False
        opening.result()
        return True

    async def cycle(self) -> int:
        """Publishes one batch; returns how many source entries it moved past."""
        batch = await self.source.read(self.batch_size)
        if batch.size == 0:
            return 0
        if not batch.events or not tracing.enabled():
            await self._send(batch, [])
            return batch.size
        envelopes = [out.envelope for out in batch.events]
        with tracing.tracer().start_as_current_span(
            "publish",
            kind=tracing.SpanKind.PRODUCER,
            attributes={
                "carelog.publisher": self.source.name,
                "carelog.events": len(envelopes),
                "carelog.position.first": envelopes[0].position,
                "carelog.position.last": envelopes[-1].position,
                "carelog.correlation_ids": sorted(
                    {e.correlation_id for e in envelopes if e.correlation_id}
                ),
            },
            **tracing.QUIET,
        ) as span:
            # One child per message: its traceparent is what the consumer continues.
            spans = [self._message_span(out) for out in batch.events]
            try:
                await self._send(batch, spans)
            except BaseException as exc:
                tracing.mark_failed(span, exc)
                raise
            finally:
                for one in spans:
                    one.end()
        return batch.size

    @staticmethod
    def _message_span(out: Outgoing) -> Any:
        envelope = out.envelope
        attributes: dict[str, str | int] = {
            "messaging.system": "kafka",
            "messaging.destination.name": out.topic,
            "carelog.event_type": envelope.type,
            "carelog.aggregate_id": str(envelope.aggregate_id),
            "carelog.position": envelope.position,
        }
        if envelope.correlation_id:
            attributes[tracing.CORRELATION_ID] = envelope.correlation_id
        return tracing.tracer().start_span(
            f"publish {out.topic}", kind=tracing.SpanKind.PRODUCER, attributes=attributes
        )

    async def _send(self, batch: Batch, spans: Sequence[Any]) -> None:
        """Sends every event (with its span's trace context, if traced), awaits every ack,
        then records the batch's mark."""
        deliveries = []
        for i, out in enumerate(batch.events):
            envelope = out.envelope
            headers = headers_for(envelope)
            if spans:
                tracing.inject(headers, spans[i])
            deliveries.append(
                (
                    out.topic,
                    await self.producer.send(
                        out.topic,
                        value=_encoder.encode(envelope),
                        key=str(envelope.aggregate_id).encode(),
                        headers=headers,
                    ),
                )
            )
        for topic, delivery in deliveries:
            await delivery  # raises if Kafka did not take it: nothing is recorded
            PUBLISHED.labels(self.source.name, topic).inc()
        await self.source.record(batch.mark)

    async def _until_more(self) -> None:
        """Waits for the source to say there may be more, or for `stop()`."""
        more = asyncio.ensure_future(self.source.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait({more, stopping}, return_when=asyncio.FIRST_COMPLETED)
        for task in (more, stopping):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if more.done() and not more.cancelled():
            more.result()  # raises what the source's wait raised: the run loop reconnects

    async def _idle(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
