"""Process managers: commands decided in reaction to published events.

`PatientRemovals` consumes `patient.events` and, for each `PatientRemoved`, cancels
the patient's future appointments with the reason `patient-removed`; for each
`PatientErased` (an erased patient keeps no appointment), with `patient-erased`.

- Restart-safe: a batch is acknowledged only after every cancellation it causes is
  saved, so a crash (or kill) redelivers it and the work is done again.
- Idempotent: cancelling an appointment that is no longer booked is an invalid
  transition, which is skipped; so redelivery and concurrent runs cancel each
  appointment exactly once (its one `Cancelled` event), never twice.
- Which appointments: the appointments read model's future booked and checked-in
  ones for the patient, read once the model has caught up with the removal's
  position (bounded wait). A booking can no longer be made for a removed patient
  (the write side refuses it), so only a booking racing the removal itself could
  be missed; docs/appointments.md says so.
- Who: each cancellation carries the removal's actor (the user who removed the
  patient); a removal stored before actors were recorded gives the system actor
  `system:carelog-patient-removals`.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog
from faststream.kafka import KafkaBroker
from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool

from commands.scheduling import SchedulingService
from domain.contracts import PatientErasedV1, PatientRemovedV1
from domain.events import acting_as, actor_of
from domain.scheduling import AppointmentNotFound, InvalidTransition
from readmodels import appointments as model
from runtime.consumers import Batch, EventBatchWorker

log = structlog.get_logger(__name__)

GROUP = "carelog-patient-removals"
REASON = "patient-removed"
ERASED_REASON = "patient-erased"
REASONS: dict[type, str] = {PatientRemovedV1: REASON, PatientErasedV1: ERASED_REASON}
"""The events that end a patient's appointments, and the cancellation reason of each."""

CANCELLED = Counter(
    "carelog_patient_removal_cancellations_total",
    "Appointments cancelled because their patient was removed, by outcome",
    ["outcome"],
)


class PatientRemovals(EventBatchWorker):
    """Cancels a removed patient's future appointments."""

    opens_sealed = False  # it acts on removals and erasures, which carry nothing sealed

    def __init__(
        self,
        scheduling: SchedulingService,
        pool: AsyncConnectionPool[Any],
        broker: KafkaBroker,
        dead_letter_topic: str,
        catch_up_seconds: float = 2.0,
    ):
        super().__init__("patient-removals", broker, dead_letter_topic)
        self.scheduling = scheduling
        self.pool = pool
        self.catch_up_seconds = catch_up_seconds

    async def apply(self, batch: Batch) -> None:
        for envelope, data in batch:
            reason = REASONS.get(type(data))
            if reason is None:
                continue
            await self._caught_up(envelope.position)
            async with self.pool.connection() as conn:
                future = await model.active_after(conn, envelope.aggregate_id, datetime.now(UTC))
            # The cancellations are the remover's doing: they carry the removal's actor.
            with acting_as(actor_of(envelope.actor_id, envelope.actor_role, GROUP)):
                for appointment_id in future:
                    outcome = await anyio.to_thread.run_sync(
                        self._cancel, appointment_id, reason, envelope.correlation_id
                    )
                    CANCELLED.labels(outcome).inc()
            log.info(
                "patient's appointments cancelled",
                patient_id=str(envelope.aggregate_id),
                reason=reason,
                appointments=len(future),
            )

    def _cancel(self, appointment_id: Any, reason: str, correlation_id: str | None) -> str:
        try:
            self.scheduling.cancel(appointment_id, reason, None, correlation_id)
        except (InvalidTransition, AppointmentNotFound):
            return "skipped"  # already cancelled, completed or gone: done before
        return "cancelled"

    async def _caught_up(self, position: int) -> None:
        """Waits (bounded) until the appointments model has applied up to `position`."""
        deadline = time.monotonic() + self.catch_up_seconds
        while time.monotonic() < deadline:
            async with self.pool.connection() as conn:
                if await model.tracked_position(conn) >= position:
                    return
            await asyncio.sleep(0.2)
        log.warning("appointments model behind; using what it has", position=position)
