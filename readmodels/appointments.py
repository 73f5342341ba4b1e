"""The appointments read model's contract: its tables, rows and queries.

The appointments projection writes through this module and the query API reads
through it; neither imports the other. Tables come from the migrations
(`bootstrap/migrations/0005.appointments.sql`). Every row keeps the aggregate
version and global position it reflects; `appointment_positions` records every
position applied, so a reader can wait for its own write (`minPosition`).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from psycopg import sql
from psycopg.rows import class_row

NAME = "appointments"


@dataclass(frozen=True)
class Tables:
    appointments: str = "appointments"
    clinicians: str = "clinicians"
    time_off: str = "clinician_time_off"
    positions: str = "appointment_positions"
    tracking: str = "projection_tracking"


LIVE = Tables()


class AppointmentRow(msgspec.Struct, rename="camel", kw_only=True):
    """One appointment as the query API shows it (`reason` may be withheld: None)."""

    id: UUID
    patient_id: UUID
    clinician_id: UUID
    start: datetime
    end: datetime
    duration_minutes: int
    reason: str | None
    status: str
    cancellation_reason: str | None
    version: int


class TimeOff(msgspec.Struct, kw_only=True):
    id: UUID
    start: datetime
    end: datetime


class ClinicianRow(msgspec.Struct, rename="camel", kw_only=True):
    id: UUID
    name: str
    email: str
    timezone: str
    working_hours: dict[str, list[list[str]]]
    user_id: UUID | None
    version: int
    time_off: list[TimeOff] = []


_APPOINTMENT_COLUMNS = sql.SQL(
    "id, patient_id, clinician_id, start_at AS start, end_at AS end, duration_minutes,"
    " reason, status, cancellation_reason, version"
)
_CLINICIAN_COLUMNS = sql.SQL("id, name, email, timezone, working_hours, user_id, version")

appointment_rows = class_row(AppointmentRow)
clinician_rows = class_row(ClinicianRow)

SORTS = {"start": "start_at", "-start": "start_at"}


class Cursor(msgspec.Struct, array_like=True):
    sort: str
    start: datetime
    id: UUID


def encode_cursor(cursor: Cursor) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(cursor)).decode().rstrip("=")


def decode_cursor(raw: str) -> Cursor | None:
    """The cursor, or None if it is not one this API issued."""
    try:
        return msgspec.json.decode(
            base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)), type=Cursor
        )
    except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError):
        return None


@dataclass(frozen=True)
class AppointmentQuery:
    limit: int = 50
    sort: str = "start"
    cursor: Cursor | None = None
    patient_id: UUID | None = None
    clinician_id: UUID | None = None
    start_from: datetime | None = None
    start_to: datetime | None = None
    statuses: tuple[str, ...] = ()


async def list_appointments(
    conn: psycopg.AsyncConnection[Any], query: AppointmentQuery, tables: Tables = LIVE
) -> tuple[list[AppointmentRow], Cursor | None]:
    """A page in start order (then id), after the cursor; and the next page's cursor."""
    descending = query.sort.startswith("-")
    where: list[sql.Composable] = []
    params: list[Any] = []
    for column, value in (("patient_id", query.patient_id), ("clinician_id", query.clinician_id)):
        if value is not None:
            where.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
            params.append(value)
    if query.start_from is not None:
        where.append(sql.SQL("start_at >= %s"))
        params.append(query.start_from)
    if query.start_to is not None:
        where.append(sql.SQL("start_at < %s"))
        params.append(query.start_to)
    if query.statuses:
        where.append(sql.SQL("status = ANY(%s)"))
        params.append(list(query.statuses))
    if query.cursor is not None:
        where.append(
            sql.SQL("(start_at, id) < (%s, %s)" if descending else "(start_at, id) > (%s, %s)")
        )
        params += [query.cursor.start, query.cursor.id]
    order = sql.SQL("start_at DESC, id DESC" if descending else "start_at, id")
    statement = sql.SQL("SELECT {} FROM {} {} ORDER BY {} LIMIT %s").format(
        _APPOINTMENT_COLUMNS,
        sql.Identifier(tables.appointments),
        sql.SQL("WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""),
        order,
    )
    params.append(query.limit + 1)
    async with conn.cursor(row_factory=appointment_rows) as cur:
        await cur.execute(statement, params)
        rows = await cur.fetchall()
    more = len(rows) > query.limit
    rows = rows[: query.limit]
    following = Cursor(query.sort, rows[-1].start, rows[-1].id) if more and rows else None
    return rows, following


async def get_appointment(
    conn: psycopg.AsyncConnection[Any], appointment_id: UUID, tables: Tables = LIVE
) -> AppointmentRow | None:
    async with conn.cursor(row_factory=appointment_rows) as cur:
        await cur.execute(
            sql.SQL("SELECT {} FROM {} WHERE id = %s").format(
                _APPOINTMENT_COLUMNS, sql.Identifier(tables.appointments)
            ),
            [appointment_id],
        )
        return await cur.fetchone()


async def busy_between(
    conn: psycopg.AsyncConnection[Any],
    clinician_id: UUID,
    start: datetime,
    end: datetime,
    tables: Tables = LIVE,
) -> list[tuple[datetime, datetime]]:
    """The clinician's active (booked or checked-in) appointments that overlap [start, end)."""
    cur = await conn.execute(
        sql.SQL(
            "SELECT start_at, end_at FROM {} WHERE clinician_id = %s"
            " AND status IN ('booked', 'checked-in') AND start_at < %s AND end_at > %s"
            " ORDER BY start_at"
        ).format(sql.Identifier(tables.appointments)),
        [clinician_id, end, start],
    )
    return [(row[0], row[1]) for row in await cur.fetchall()]


async def list_clinicians(
    conn: psycopg.AsyncConnection[Any],
    limit: int,
    after: tuple[str, UUID] | None,
    tables: Tables = LIVE,
) -> list[ClinicianRow]:
    """Clinicians in name order (then id), after (name key, id)."""
    where = sql.SQL("WHERE (name_key, id) > (%s, %s)") if after else sql.SQL("")
    statement = sql.SQL("SELECT {} FROM {} {} ORDER BY name_key, id LIMIT %s").format(
        _CLINICIAN_COLUMNS, sql.Identifier(tables.clinicians), where
    )
    async with conn.cursor(row_factory=clinician_rows) as cur:
        await cur.execute(statement, [*(after or ()), limit])
        return await cur.fetchall()


async def get_clinician(
    conn: psycopg.AsyncConnection[Any], clinician_id: UUID, tables: Tables = LIVE
) -> ClinicianRow | None:
    async with conn.cursor(row_factory=clinician_rows) as cur:
        await cur.execute(
            sql.SQL("SELECT {} FROM {} WHERE id = %s").format(
                _CLINICIAN_COLUMNS, sql.Identifier(tables.clinicians)
            ),
            [clinician_id],
        )
        row = await cur.fetchone()
    if row is None:
        return None
    cur2 = await conn.execute(
        sql.SQL(
            "SELECT time_off_id, start_at, end_at FROM {} WHERE clinician_id = %s ORDER BY start_at"
        ).format(sql.Identifier(tables.time_off)),
        [clinician_id],
    )
    row.time_off = [TimeOff(id=r[0], start=r[1], end=r[2]) for r in await cur2.fetchall()]
    return row


async def clinician_of_user(
    conn: psycopg.AsyncConnection[Any], user_id: UUID, tables: Tables = LIVE
) -> UUID | None:
    """The clinician an auth user signs in as, if any."""
    cur = await conn.execute(
        sql.SQL("SELECT id FROM {} WHERE user_id = %s LIMIT 1").format(
            sql.Identifier(tables.clinicians)
        ),
        [user_id],
    )
    row = await cur.fetchone()
    return row[0] if row else None


async def active_after(
    conn: psycopg.AsyncConnection[Any], patient_id: UUID, moment: datetime, tables: Tables = LIVE
) -> list[UUID]:
    """The patient's booked or checked-in appointments that start after `moment`."""
    cur = await conn.execute(
        sql.SQL(
            "SELECT id FROM {} WHERE patient_id = %s AND status IN ('booked', 'checked-in')"
            " AND start_at > %s ORDER BY start_at, id"
        ).format(sql.Identifier(tables.appointments)),
        [patient_id, moment],
    )
    return [row[0] for row in await cur.fetchall()]


async def tracked_position(conn: psycopg.AsyncConnection[Any], tables: Tables = LIVE) -> int:
    """The highest global position the appointments projection has applied (0: none)."""
    cur = await conn.execute(
        sql.SQL("SELECT position FROM {} WHERE projection = %s").format(
            sql.Identifier(tables.tracking)
        ),
        [NAME],
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0
