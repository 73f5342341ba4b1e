"""The notifier's consumer: turns events into ledger rows, once per (cause, purpose, patient).

A row's id is derived from its key, so a redelivered or replayed event inserts
nothing new (`ON CONFLICT DO NOTHING`), and the batch's rows commit in one
transaction (one statement) before the batch is acknowledged. What to send is
decided here; when and how is the sender's job (`notifications/sender.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid5

import psycopg
from faststream.kafka import KafkaBroker
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from domain import contracts as c
from runtime.consumers import Batch, EventBatchWorker

GROUP = "carelog-notifier"
_KEYS = UUID("0b7c6f0e-2f55-4d6b-9a4e-9d1b8a3c5e71")

WELCOME = "welcome"
CONFIRMATION = "booking-confirmation"
RESCHEDULED = "reschedule-notice"
CANCELLED = "cancellation-notice"
REMINDER = "reminder"

PURPOSES = (WELCOME, CONFIRMATION, RESCHEDULED, CANCELLED, REMINDER)
ESSENTIAL = frozenset({WELCOME, CONFIRMATION, RESCHEDULED, CANCELLED})
"""Sent whatever the patient's preferences: they confirm what the patient asked for."""


def notification_id(source: str, purpose: str, patient_id: UUID) -> UUID:
    """The ledger id, and so the Message-ID, of one (cause, purpose, recipient)."""
    return uuid5(_KEYS, f"{source}|{purpose}|{patient_id}")


Owed = tuple[str, str, UUID, Any]
"""A message owed: (source, purpose, patient id, details)."""


async def plan(
    cur: psycopg.AsyncCursor[Any], source: str, purpose: str, patient_id: UUID, details: Any
) -> None:
    """Records that a message is owed (nothing if it is already recorded)."""
    await cur.execute(
        "INSERT INTO notifications (id, patient_id, purpose, source, status, details)"
        " VALUES (%s, %s, %s, %s, 'pending', %s) ON CONFLICT (id) DO NOTHING",
        [notification_id(source, purpose, patient_id), patient_id, purpose, source, Jsonb(details)],
    )


async def plan_all(cur: psycopg.AsyncCursor[Any], owed: Sequence[Owed]) -> None:
    """`plan` for many messages, in one statement (one alone costs less as it is)."""
    if len(owed) <= 1:
        for source, purpose, patient, details in owed:
            await plan(cur, source, purpose, patient, details)
        return
    await cur.execute(
        "INSERT INTO notifications (id, patient_id, purpose, source, status, details)"
        " SELECT id, patient_id, purpose, source, 'pending', details"
        " FROM unnest(%s::uuid[], %s::uuid[], %s::text[], %s::text[], %s::jsonb[])"
        " AS o(id, patient_id, purpose, source, details) ON CONFLICT (id) DO NOTHING",
        [
            [notification_id(source, purpose, patient) for source, purpose, patient, _ in owed],
            [patient for _, _, patient, _ in owed],
            [purpose for _, purpose, _, _ in owed],
            [source for source, _, _, _ in owed],
            [Jsonb(details) for _, _, _, details in owed],
        ],
    )


class NotificationIntake:
    """Applies patient and appointment events to the ledger and what it needs to know."""

    def __init__(self, max_age: timedelta = timedelta(hours=24)):
        self.max_age = max_age

    async def apply(
        self, conn: psycopg.AsyncConnection[Any], batch: Sequence[tuple[c.Envelope[Any], Any]]
    ) -> int:
        owed: list[Owed] = []
        async with conn.transaction(), conn.cursor() as cur:
            cutoff = datetime.now(UTC) - self.max_age
            # The batch's statements go in a pipeline: one round trip, not one per event
            # (a lookup of an appointment's patient still waits for what came before).
            async with conn.pipeline():
                for envelope, data in batch:
                    source = f"event:{envelope.event_id}"
                    late = envelope.occurred_at < cutoff
                    if isinstance(data, c.PatientRegisteredV2):
                        if late:
                            continue
                        owed.append((source, WELCOME, envelope.aggregate_id, None))
                    elif isinstance(data, c.PatientPreferencesChangedV1):
                        await cur.execute(
                            "INSERT INTO notification_preferences (patient_id, reminders, version)"
                            " VALUES (%s, %s, %s) ON CONFLICT (patient_id) DO UPDATE SET"
                            " reminders = EXCLUDED.reminders, version = EXCLUDED.version"
                            " WHERE notification_preferences.version < EXCLUDED.version",
                            [envelope.aggregate_id, data.reminders, envelope.aggregate_version],
                        )
                    elif isinstance(data, c.AppointmentBookedV1):
                        await cur.execute(
                            "INSERT INTO notification_appointments (id, patient_id) VALUES (%s, %s)"
                            " ON CONFLICT DO NOTHING",
                            [envelope.aggregate_id, data.patient_id],
                        )
                        if late:
                            continue
                        details = about(envelope.aggregate_id, data.clinician_id, data.start)
                        owed.append((source, CONFIRMATION, data.patient_id, details))
                    elif isinstance(data, c.AppointmentRescheduledV1 | c.AppointmentCancelledV1):
                        patient = await self._patient_of(cur, envelope.aggregate_id)
                        if patient is None or late:
                            continue  # booked before the notifier knew: nobody to tell
                        start = getattr(data, "start", None)
                        purpose = RESCHEDULED if start is not None else CANCELLED
                        details = about(envelope.aggregate_id, None, start)
                        owed.append((source, purpose, patient, details))
                await plan_all(cur, owed)
        return len(owed)

    async def _patient_of(self, cur: psycopg.AsyncCursor[Any], appointment: UUID) -> UUID | None:
        await cur.execute(
            "SELECT patient_id FROM notification_appointments WHERE id = %s", [appointment]
        )
        row = await cur.fetchone()
        return row[0] if row else None


def about(appointment: UUID, clinician: UUID | None, start: Any) -> dict[str, Any]:
    return {
        "appointmentId": str(appointment),
        "clinicianId": str(clinician) if clinician else None,
        "start": start.astimezone(UTC).isoformat() if start is not None else None,
    }


class IntakeWorker(EventBatchWorker):
    reads = frozenset[str]()
    """No personal field: the sender reads the address when it sends. A sealed payload is
    still opened far enough to tell an erased patient's (`Unreadable`: nothing is owed)."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        broker: KafkaBroker,
        dead_letter_topic: str,
        max_age: timedelta = timedelta(hours=24),
    ):
        super().__init__("notifier", broker, dead_letter_topic)
        self.pool = pool
        self.intake = NotificationIntake(max_age)

    async def apply(self, batch: Batch) -> None:
        async with self.pool.connection() as conn:
            await self.intake.apply(conn, batch)
