"""The appointments read model: clinicians, their time off and appointments, from
`appointment.events`.

Applying is idempotent, as for the directory: every row keeps the aggregate version
it reflects and an event changes it only over an older version (time off is added
or removed only when its clinician's version moves), so redelivery, restarts and
replays apply nothing twice. Rows, positions and the tracking record are written in
one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import psycopg
from faststream.kafka import KafkaBroker
from prometheus_client import Counter, Gauge
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from domain import contracts as c
from readmodels.appointments import LIVE, NAME, Tables
from readmodels.swaps import applying
from readmodels.tracking import applied_params, applied_statement, track_statement
from runtime.consumers import Batch, EventBatchWorker, UnappliableEvent

GROUP = "carelog-appointments"

EVENTS = Counter(
    "carelog_appointments_projection_events_total",
    "Events handled by the appointments projection",
    ["outcome"],
)
POSITION = Gauge(
    "carelog_appointments_projection_position", "Highest global position the model has applied"
)

_STATUS = c.STATUS_AFTER


class AppointmentsProjection:
    """Applies clinician and appointment events to the appointments tables."""

    def __init__(self, tables: Tables = LIVE, name: str = NAME):
        self.tables = tables
        self.name = name
        t = tables
        self._book = (
            f"INSERT INTO {t.appointments} (id, version, position, patient_id, clinician_id,"
            " start_at, end_at, duration_minutes, reason, status, booked_at)"
            " VALUES (%(id)s, %(version)s, %(position)s, %(patient_id)s, %(clinician_id)s,"
            " %(start)s, %(end)s, %(minutes)s, %(reason)s, 'booked', %(at)s)"
            " ON CONFLICT (id) DO NOTHING RETURNING id"
        )
        self._move = (
            f"UPDATE {t.appointments} SET version = %(version)s, position = %(position)s,"
            " start_at = %(start)s, end_at = %(end)s, duration_minutes = %(minutes)s,"
            " updated_at = now() WHERE id = %(id)s AND version < %(version)s RETURNING id"
        )
        self._status = (
            f"UPDATE {t.appointments} SET version = %(version)s, position = %(position)s,"
            " status = %(status)s, cancellation_reason = COALESCE(%(cancel)s, cancellation_reason),"
            " updated_at = now() WHERE id = %(id)s AND version < %(version)s RETURNING id"
        )
        self._register = (
            f"INSERT INTO {t.clinicians} (id, version, position, name, name_key, email,"
            " timezone, working_hours) VALUES (%(id)s, %(version)s, %(position)s, %(name)s,"
            " lower(%(name)s), %(email)s, %(timezone)s, %(hours)s)"
            " ON CONFLICT (id) DO NOTHING RETURNING id"
        )
        self._clinician = (
            f"UPDATE {t.clinicians} SET version = %(version)s, position = %(position)s,"
            " working_hours = COALESCE(%(hours)s, working_hours),"
            " user_id = COALESCE(%(user_id)s, user_id), updated_at = now()"
            " WHERE id = %(id)s AND version < %(version)s RETURNING id"
        )
        self._add_off = (
            f"INSERT INTO {t.time_off} (clinician_id, time_off_id, start_at, end_at)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING"
        )
        self._remove_off = f"DELETE FROM {t.time_off} WHERE clinician_id = %s AND time_off_id = %s"
        self._exists = {
            "Appointment": f"SELECT 1 FROM {t.appointments} WHERE id = %s",
            "Clinician": f"SELECT 1 FROM {t.clinicians} WHERE id = %s",
        }
        self._applied = applied_statement(t.positions)
        self._track = track_statement(t.tracking)

    async def apply(
        self, conn: psycopg.AsyncConnection[Any], batch: Sequence[tuple[c.Envelope[Any], Any]]
    ) -> tuple[int, int, int]:
        """Applies decoded events in one transaction: (applied, duplicates, position)."""
        applied = duplicates = position = 0
        async with conn.transaction(), conn.cursor() as cur:
            await applying(cur, self.name)
            for envelope, data in batch:
                position = max(position, envelope.position)
                if await self._one(cur, envelope, data):
                    applied += 1
                    continue
                await cur.execute(self._exists[envelope.aggregate_type], [envelope.aggregate_id])
                if await cur.fetchone() is None:
                    raise UnappliableEvent(
                        f"{envelope.type} v{envelope.aggregate_version} for an"
                        f" {envelope.aggregate_type.lower()} the model has never seen"
                    )
                duplicates += 1
            await cur.execute(
                self._applied, applied_params((e.position, e.aggregate_id) for e, _ in batch)
            )
            await cur.execute(self._track, [self.name, position, applied])
        return applied, duplicates, position

    async def _one(
        self, cur: psycopg.AsyncCursor[Any], envelope: c.Envelope[Any], data: Any
    ) -> bool:
        """Applies one event; False if it changed nothing (already applied)."""
        base = {
            "id": envelope.aggregate_id,
            "version": envelope.aggregate_version,
            "position": envelope.position,
        }
        # A reason is kept as published: sealed (the query API opens it; once the patient
        # is erased it opens to nothing), or in the clear if booked before sealing began.
        if isinstance(data, c.AppointmentBookedV1 | c.AppointmentBookedV2):
            await cur.execute(
                self._book,
                base
                | {
                    "patient_id": data.patient_id,
                    "clinician_id": data.clinician_id,
                    "start": data.start,
                    "end": data.start + timedelta(minutes=data.duration_minutes),
                    "minutes": data.duration_minutes,
                    "reason": data.reason,
                    "at": envelope.occurred_at,
                },
            )
        elif isinstance(data, c.AppointmentRescheduledV1):
            end = data.start + timedelta(minutes=data.duration_minutes)
            await cur.execute(
                self._move,
                base | {"start": data.start, "end": end, "minutes": data.duration_minutes},
            )
        elif type(data) in _STATUS:
            cancel = data.reason if isinstance(data, c.AppointmentCancelledV1) else None
            await cur.execute(
                self._status, base | {"status": _STATUS[type(data)], "cancel": cancel}
            )
        elif isinstance(data, c.ClinicianRegisteredV1):
            await cur.execute(
                self._register,
                base
                | {
                    "name": data.name,
                    "email": data.email,
                    "timezone": data.timezone,
                    "hours": Jsonb(data.working_hours),
                },
            )
        elif isinstance(
            data,
            (
                c.ClinicianWorkingHoursChangedV1,
                c.ClinicianUserLinkedV1,
                c.ClinicianTimeOffAddedV1,
                c.ClinicianTimeOffRemovedV1,
            ),
        ):
            hours = getattr(data, "working_hours", None)
            await cur.execute(
                self._clinician,
                base
                | {
                    "hours": Jsonb(hours) if hours is not None else None,
                    "user_id": getattr(data, "user_id", None),
                },
            )
            if await cur.fetchone() is None:
                return False
            if isinstance(data, c.ClinicianTimeOffAddedV1):
                await cur.execute(
                    self._add_off, [envelope.aggregate_id, data.time_off_id, data.start, data.end]
                )
            elif isinstance(data, c.ClinicianTimeOffRemovedV1):
                await cur.execute(self._remove_off, [envelope.aggregate_id, data.time_off_id])
            return True
        else:
            raise UnappliableEvent(f"{envelope.type} is not an appointments event")
        return await cur.fetchone() is not None


class AppointmentsWorker(EventBatchWorker):
    """Applies batches of `appointment.events` to the appointments model."""

    opens_sealed = False  # reasons stay sealed in the model; the query API opens them

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        broker: KafkaBroker,
        dead_letter_topic: str,
        projection: AppointmentsProjection | None = None,
    ):
        self.projection = projection or AppointmentsProjection()
        super().__init__(self.projection.name, broker, dead_letter_topic)
        self.pool = pool

    async def apply(self, batch: Batch) -> None:
        async with self.pool.connection() as conn:
            applied, duplicates, position = await self.projection.apply(conn, batch)
        EVENTS.labels("applied").inc(applied)
        EVENTS.labels("duplicate").inc(duplicates)
        POSITION.set(position)
