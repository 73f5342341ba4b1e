"""The analytics read model: facts from `patient.events`, `appointment.events` and
`billing.events`, for counts and sums (`readmodels/analytics.py`).

Idempotent like the other projections: patient and appointment rows keep the
aggregate version they reflect and change only over an older one; a money movement
is keyed by its event id. Rows, positions and the tracking record are written in
one transaction. Events it does not count (clinicians, check-ins, accounts) are
acknowledged and recorded as applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast
from uuid import UUID

import psycopg
from faststream.kafka import KafkaBroker
from prometheus_client import Counter
from psycopg_pool import AsyncConnectionPool

from domain import contracts as c
from domain.billing import AGGREGATE_TYPE as BILLING
from domain.billing import InvoiceIssuedV1, PaymentRecordedV1
from readmodels.analytics import LIVE, NAME, Tables
from readmodels.swaps import applying
from readmodels.tracking import applied_params, applied_statement, track_statement
from runtime.consumers import Batch, EventBatchWorker
from runtime.db import arrays

GROUP = "carelog-analytics"

EVENTS = Counter(
    "carelog_analytics_projection_events_total",
    "Events handled by the analytics projection",
    ["outcome"],
)

_STATUS = c.STATUS_AFTER


class AnalyticsProjection:
    """Applies patient, appointment and billing events to the analytics facts."""

    def __init__(self, tables: Tables = LIVE, name: str = NAME):
        self.tables = tables
        self.name = name
        t = tables
        # Registrations, many in one statement (`_register_many`): a row per array element,
        # the arrays in binary (see `applied_statement`).
        self._register = (
            f"INSERT INTO {t.patients} (id, version, position, registered_date, date_of_birth)"
            " SELECT * FROM unnest(%b::uuid[], %b::bigint[], %b::bigint[], %b::date[],"
            " %b::date[]) ON CONFLICT (id) DO NOTHING"
        )
        self._patient = (
            f"UPDATE {t.patients} SET version = %(version)s, position = %(position)s,"
            " date_of_birth = COALESCE(%(born)s, date_of_birth),"
            " removed_at = COALESCE(%(removed)s, removed_at)"
            " WHERE id = %(id)s AND version < %(version)s"
        )
        self._forget_birth = (
            f"UPDATE {t.patients} SET version = %(version)s, position = %(position)s,"
            " date_of_birth = NULL WHERE id = %(id)s AND version < %(version)s"
        )
        self._book = (
            f"INSERT INTO {t.appointments} (id, version, position, clinician_id, booked_at,"
            " start_at, status) VALUES (%(id)s, %(version)s, %(position)s, %(clinician)s,"
            " %(at)s, %(start)s, 'booked') ON CONFLICT (id) DO NOTHING"
        )
        self._appointment = (
            f"UPDATE {t.appointments} SET version = %(version)s, position = %(position)s,"
            " start_at = COALESCE(%(start)s, start_at), status = COALESCE(%(status)s, status)"
            " WHERE id = %(id)s AND version < %(version)s"
        )
        self._money = (
            f"INSERT INTO {t.money} (id, position, kind, currency, amount_minor, occurred_at)"
            " VALUES (%(event)s, %(position)s, %(kind)s, %(currency)s, %(amount)s, %(at)s)"
            " ON CONFLICT (id) DO NOTHING"
        )
        self._applied = applied_statement(t.positions)
        self._track = track_statement(t.tracking)

    def _unreadable(
        self, base: dict[str, Any], sealed: Any, envelope: c.Envelope[Any]
    ) -> tuple[str, dict[str, Any]] | None:
        if isinstance(sealed, c.PatientDetailsChangedV2):
            return self._forget_birth, base
        if isinstance(sealed, c.AppointmentBookedV2):
            return self._book, base | {
                "clinician": sealed.clinician_id,
                "at": envelope.occurred_at,
                "start": sealed.start,
            }
        return None

    def _statement(self, envelope: c.Envelope[Any], data: Any) -> tuple[str, dict[str, Any]] | None:
        base = {
            "id": envelope.aggregate_id,
            "version": envelope.aggregate_version,
            "position": envelope.position,
        }
        if isinstance(data, c.PatientDetailsChangedV1):
            return self._patient, base | {"born": data.date_of_birth, "removed": None}
        if isinstance(data, c.PatientRemovedV1):
            return self._patient, base | {"born": None, "removed": envelope.occurred_at}
        if isinstance(data, c.PatientErasedV1):
            return self._forget_birth, base
        if isinstance(data, c.Unreadable):  # an erased patient's: counted, nothing personal
            return self._unreadable(base, data.sealed, envelope)
        if isinstance(data, c.AppointmentBookedV1):
            return self._book, base | {
                "clinician": data.clinician_id,
                "at": envelope.occurred_at,
                "start": data.start,
            }
        if isinstance(data, c.AppointmentRescheduledV1):
            return self._appointment, base | {"start": data.start, "status": None}
        if type(data) in _STATUS:
            return self._appointment, base | {"start": None, "status": _STATUS[type(data)]}
        if isinstance(data, InvoiceIssuedV1 | PaymentRecordedV1):
            invoiced = isinstance(data, InvoiceIssuedV1)
            return self._money, {
                "event": envelope.event_id,
                "position": envelope.position,
                "kind": "invoiced" if invoiced else "paid",
                "currency": data.currency,
                "amount": data.total_minor if invoiced else data.amount_minor,  # type: ignore[union-attr]
                "at": envelope.occurred_at,
            }
        return None  # clinicians, account openings and closings: nothing to count

    async def apply(
        self, conn: psycopg.AsyncConnection[Any], batch: Sequence[tuple[c.Envelope[Any], Any]]
    ) -> tuple[int, int]:
        """Applies decoded events in one transaction: (events counted, position)."""
        position = counted = 0
        # Registrations met one after another (most of a batch under load) go as one
        # statement, sent before the next other event.
        run: list[tuple[c.Envelope[Any], Any]] = []
        async with conn.transaction(), conn.cursor() as cur:
            await applying(cur, self.name)
            async with conn.pipeline():
                for envelope, data in batch:
                    position = max(position, envelope.position)
                    if c.registers(data):
                        run.append((envelope, data))
                        continue
                    counted += await self._register_many(cur, run)
                    statement = self._statement(envelope, data)
                    if statement is not None:
                        await cur.execute(*statement)
                        counted += 1
                counted += await self._register_many(cur, run)
            # Only the event store's positions: billing's events are numbered by its outbox.
            events = [(e.position, e.aggregate_id) for e, _ in batch if e.aggregate_type != BILLING]
            if events:
                await cur.execute(self._applied, applied_params(events))
            await cur.execute(self._track, [self.name, position, counted])
        return counted, position

    async def _register_many(
        self, cur: psycopg.AsyncCursor[Any], run: list[tuple[c.Envelope[Any], Any]]
    ) -> int:
        """Sends the registrations in `run` as one statement and empties it; returns how many
        events it counted (all of them). A patient twice (a redelivery) is inserted once."""
        if not run:
            return 0
        first: dict[UUID, list[Any]] = {}
        for envelope, data in run:
            if envelope.aggregate_id in first:
                continue
            if isinstance(data, c.Unreadable):  # an erased patient's: counted, no birth date
                registered, born = cast(c.PatientRegisteredV3, data.sealed).registered_date, None
            else:
                registered, born = data.registered_date, data.date_of_birth
            first[envelope.aggregate_id] = [
                envelope.aggregate_id,
                envelope.aggregate_version,
                envelope.position,
                registered,
                born,
            ]
        await cur.execute(self._register, arrays(first.values()))
        counted = len(run)
        run.clear()
        return counted


class AnalyticsWorker(EventBatchWorker):
    """Applies batches of the three streams to the analytics facts."""

    reads = frozenset({"date_of_birth"})
    """Ages are the only personal fact it counts; names, contacts and reasons stay sealed."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        broker: KafkaBroker,
        dead_letter_topic: str,
        projection: AnalyticsProjection | None = None,
    ):
        self.projection = projection or AnalyticsProjection()
        super().__init__(self.projection.name, broker, dead_letter_topic)
        self.pool = pool

    async def apply(self, batch: Batch) -> None:
        async with self.pool.connection() as conn:
            counted, _ = await self.projection.apply(conn, batch)
        EVENTS.labels("counted").inc(counted)
        EVENTS.labels("seen").inc(len(batch))
