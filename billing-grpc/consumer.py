"""Billing's consumer group on `patient.events`: an account per registered patient.

Batches are applied in one transaction and acknowledged only after it commits
(AckPolicy.NACK_ON_ERROR), so a crash redelivers them; applying is idempotent,
so redelivery and replays change nothing twice. A message that cannot be decoded
or applied goes to the dead-letter topic and the consumer carries on.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import msgspec
import psycopg
import psycopg_pool
import structlog
from billing_grpc.service import Billing, UnappliableEvent
from faststream import AckPolicy
from faststream.kafka import KafkaBroker
from prometheus_client import Counter, Gauge

from domain import contracts
from ops.kafka import raw_bodies

log = structlog.get_logger(__name__)

EVENTS = Counter(
    "carelog_billing_patient_events_total", "Patient events handled by billing", ["outcome"]
)
LAG = Gauge(
    "carelog_billing_lag_seconds",
    "Time from a patient event's occurrence to billing applying it, for the latest batch",
)

_TRANSIENT = (psycopg.OperationalError, psycopg_pool.PoolTimeout)


class PatientEventsWorker:
    """Decodes a batch, applies it in one transaction, dead-letters what cannot apply."""

    def __init__(self, billing: Billing, broker: KafkaBroker, dead_letter_topic: str):
        self.billing = billing
        self.broker = broker
        self.dead_letter_topic = dead_letter_topic

    async def handle(self, bodies: list[bytes]) -> None:
        decoded = []
        for body in bodies:
            try:
                decoded.append(contracts.decode(body))
            except (msgspec.DecodeError, msgspec.ValidationError, KeyError) as exc:
                await self.dead_letter(body, f"undecodable: {exc}")
        if not decoded:
            return
        try:
            try:
                await self._apply(decoded)
            except UnappliableEvent:
                # Apply one by one, so only the event that cannot apply is set aside.
                for one in decoded:
                    try:
                        await self._apply([one])
                    except UnappliableEvent as exc:
                        await self.dead_letter(msgspec.json.encode(one[0]), str(exc))
        except _TRANSIENT as exc:
            log.warning("billing batch failed; will be redelivered", error=repr(exc))
            await asyncio.sleep(1.0)
            raise

    async def _apply(self, batch: list[tuple[contracts.Envelope[Any], Any]]) -> None:
        applied = await self.billing.apply_patient_events(batch)
        EVENTS.labels("opened").inc(applied.opened)
        EVENTS.labels("closed").inc(applied.closed)
        EVENTS.labels("unchanged").inc(applied.unchanged)
        newest = max(envelope.occurred_at for envelope, _ in batch)
        LAG.set(max(0.0, (datetime.now(UTC) - newest).total_seconds()))

    async def dead_letter(self, body: bytes, reason: str) -> None:
        EVENTS.labels("dead_lettered").inc()
        log.error("patient event dead-lettered", reason=reason[:200], topic=self.dead_letter_topic)
        await self.broker.publish(
            body, topic=self.dead_letter_topic, headers={"error": reason[:500]}
        )


def subscribe(broker: KafkaBroker, topic: str, worker: PatientEventsWorker, group: str) -> None:
    """Feeds batches of `topic` (patient events) to the worker, as consumer group `group`."""

    @broker.subscriber(
        topic,
        group_id=group,
        auto_offset_reset="earliest",
        batch=True,
        max_records=500,
        batch_timeout_ms=20,
        ack_policy=AckPolicy.NACK_ON_ERROR,
        decoder=raw_bodies,
    )
    async def on_patient_events(bodies: list[bytes]) -> None:
        await worker.handle(bodies)
