"""Billing's consumer group on `patient.events`: an account per registered patient.

Batches are applied in one transaction and acknowledged only after it commits
(AckPolicy.NACK_ON_ERROR), so a crash redelivers them; applying is idempotent,
so redelivery and replays change nothing twice. A message that cannot be decoded
or applied goes to the dead-letter topic and the consumer carries on.
"""

from __future__ import annotations

from datetime import UTC, datetime

import structlog
from faststream.kafka import KafkaBroker
from prometheus_client import Counter, Gauge

from billing_grpc.service import Billing
from runtime.consumers import Batch, EventBatchWorker

log = structlog.get_logger(__name__)

EVENTS = Counter(
    "carelog_billing_patient_events_total", "Patient events handled by billing", ["outcome"]
)
LAG = Gauge(
    "carelog_billing_lag_seconds",
    "Time from a patient event's occurrence to billing applying it, for the latest batch",
)


class PatientEventsWorker(EventBatchWorker):
    """Opens and closes accounts for a batch of patient events, in one transaction."""

    reads = frozenset({"name", "email"})
    """An account's contact; the patient's other personal fields stay sealed."""

    def __init__(self, billing: Billing, broker: KafkaBroker, dead_letter_topic: str):
        super().__init__("billing", broker, dead_letter_topic)
        self.billing = billing

    async def apply(self, batch: Batch) -> None:
        applied = await self.billing.apply_patient_events(batch)
        EVENTS.labels("opened").inc(applied.opened)
        EVENTS.labels("closed").inc(applied.closed)
        EVENTS.labels("unchanged").inc(applied.unchanged)
        newest = max(envelope.occurred_at for envelope, _ in batch)
        LAG.set(max(0.0, (datetime.now(UTC) - newest).total_seconds()))
