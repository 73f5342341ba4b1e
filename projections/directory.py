"""The patient directory: a PostgreSQL read model of current patients.

Applying is idempotent. Each row keeps the aggregate version it reflects, and an
event is applied only over an older version, so redelivery, restarts, rebalances
and replays never apply anything twice. The rows and the projection's tracking
record are written in one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from psycopg import sql

from domain.contracts import (
    Envelope,
    PatientDetailsChangedV1,
    PatientRegisteredV1,
    PatientRemovedV1,
)
from domain.patients import normalise_email
from runtime.consumers import UnappliableEvent

NAME = "directory"


class PatientRow(msgspec.Struct, rename="camel", kw_only=True):
    """One patient as the query API shows it."""

    id: UUID
    name: str
    email: str
    address: str
    date_of_birth: date
    registered_date: date
    version: int


_row_encoder = msgspec.json.Encoder()

ROW_COLUMNS = "id, name, email, address, date_of_birth, registered_date, version, removed"


@dataclass(frozen=True)
class Tables:
    """Table names, so a replay can build a fresh copy beside the live one."""

    patients: str = "directory_patients"
    tracking: str = "projection_tracking"

    def ddl(self) -> list[sql.Composed]:
        p = sql.Identifier(self.patients)

        def index(suffix: str) -> sql.Identifier:
            return sql.Identifier(f"{self.patients}_{suffix}")

        return [
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " id uuid PRIMARY KEY,"
                " version bigint NOT NULL,"
                " position bigint NOT NULL,"
                " name text NOT NULL,"
                " name_key text NOT NULL,"
                " email text NOT NULL,"
                " email_key text NOT NULL,"
                " address text NOT NULL,"
                " date_of_birth date NOT NULL,"
                " registered_date date NOT NULL,"
                " removed boolean NOT NULL DEFAULT false,"
                " updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(p),
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (name_key, id) WHERE NOT removed").format(
                index("name"), p
            ),
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS {} ON {} (registered_date, id) WHERE NOT removed"
            ).format(index("registered"), p),
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS {} ON {} (date_of_birth, id) WHERE NOT removed"
            ).format(index("dob"), p),
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (email_key) WHERE NOT removed").format(
                index("email"), p
            ),
            sql.SQL(
                "CREATE INDEX IF NOT EXISTS {} ON {} USING gin (name_key gin_trgm_ops)"
                " WHERE NOT removed"
            ).format(index("name_trgm"), p),
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} ("
                " projection text PRIMARY KEY,"
                " position bigint NOT NULL DEFAULT 0,"
                " applied bigint NOT NULL DEFAULT 0,"
                " updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(sql.Identifier(self.tracking)),
        ]


LIVE = Tables()
"""The tables the query API reads."""


async def create_tables(conn: psycopg.AsyncConnection[Any], tables: Tables = LIVE) -> None:
    async with conn.transaction():
        # Serialise concurrent creators (projection, query API, tests) on one lock.
        await conn.execute("SELECT pg_advisory_xact_lock(4242001)")
        await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        for statement in tables.ddl():
            await conn.execute(statement)


@dataclass(frozen=True)
class Outcome:
    applied: int
    duplicates: int
    changed: list[tuple[str, int, bytes]]
    """(patient id, version, JSON or b"" if removed) for every row now current."""
    position: int


class DirectoryProjection:
    """Applies patient events to the directory tables."""

    def __init__(self, tables: Tables = LIVE, name: str = NAME):
        self.tables = tables
        self.name = name
        p = sql.Identifier(tables.patients)
        self._register = sql.SQL(
            "INSERT INTO {p} (id, version, position, name, name_key, email, email_key, address,"
            " date_of_birth, registered_date, removed)"
            " VALUES (%(id)s, %(version)s, %(position)s, %(name)s, lower(%(name)s), %(email)s,"
            " %(email_key)s, %(address)s, %(date_of_birth)s, %(registered_date)s, false)"
            " ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version,"
            " position = EXCLUDED.position, name = EXCLUDED.name, name_key = EXCLUDED.name_key,"
            " email = EXCLUDED.email, email_key = EXCLUDED.email_key, address = EXCLUDED.address,"
            " date_of_birth = EXCLUDED.date_of_birth, registered_date = EXCLUDED.registered_date,"
            " removed = false, updated_at = now()"
            " WHERE {p}.version < EXCLUDED.version"
            " RETURNING id"
        ).format(p=p)
        self._change = sql.SQL(
            "UPDATE {p} SET version = %(version)s, position = %(position)s, name = %(name)s,"
            " name_key = lower(%(name)s), email = %(email)s, email_key = %(email_key)s,"
            " address = %(address)s, date_of_birth = %(date_of_birth)s, updated_at = now()"
            " WHERE id = %(id)s AND version < %(version)s"
            " RETURNING id"
        ).format(p=p)
        self._remove = sql.SQL(
            "UPDATE {p} SET version = %(version)s, position = %(position)s, removed = true,"
            " updated_at = now() WHERE id = %(id)s AND version < %(version)s RETURNING id"
        ).format(p=p)
        self._exists = sql.SQL("SELECT 1 FROM {p} WHERE id = %s").format(p=p)
        self._current = sql.SQL("SELECT " + ROW_COLUMNS + " FROM {p} WHERE id = ANY(%s)").format(
            p=p
        )
        self._track = sql.SQL(
            "INSERT INTO {t} (projection, position, applied) VALUES (%s, %s, %s)"
            " ON CONFLICT (projection) DO UPDATE SET"
            " position = GREATEST({t}.position, EXCLUDED.position),"
            " applied = {t}.applied + EXCLUDED.applied, updated_at = now()"
        ).format(t=sql.Identifier(tables.tracking))

    async def apply(
        self, conn: psycopg.AsyncConnection[Any], batch: Sequence[tuple[Envelope[Any], Any]]
    ) -> Outcome:
        """Applies decoded events in one transaction; returns what changed."""
        applied = duplicates = 0
        touched: set[UUID] = set()
        position = 0
        async with conn.transaction(), conn.cursor() as cur:
            for envelope, data in batch:
                position = max(position, envelope.position)
                params = {
                    "id": envelope.aggregate_id,
                    "version": envelope.aggregate_version,
                    "position": envelope.position,
                }
                if isinstance(data, PatientRegisteredV1):
                    statement = self._register
                    params |= _details(data) | {"registered_date": data.registered_date}
                elif isinstance(data, PatientDetailsChangedV1):
                    statement = self._change
                    params |= _details(data)
                elif isinstance(data, PatientRemovedV1):
                    statement = self._remove
                else:
                    raise UnappliableEvent(f"{envelope.type} is not a patient event")
                await cur.execute(statement, params)
                if await cur.fetchone() is None:
                    await cur.execute(self._exists, [envelope.aggregate_id])
                    if await cur.fetchone() is None:
                        raise UnappliableEvent(
                            f"{envelope.type} v{envelope.aggregate_version} for a patient"
                            " the directory has never seen"
                        )
                    duplicates += 1
                else:
                    applied += 1
                touched.add(envelope.aggregate_id)
            await cur.execute(self._track, [self.name, position, applied])
            changed = await self._rows(cur, touched)
        return Outcome(applied, duplicates, changed, position)

    async def _rows(
        self, cur: psycopg.AsyncCursor[Any], ids: set[UUID]
    ) -> list[tuple[str, int, bytes]]:
        if not ids:
            return []
        await cur.execute(self._current, [list(ids)])
        return [(str(row[0]), row[6], cache_entry(row)) for row in await cur.fetchall()]


def patient_from_row(row: Sequence[Any]) -> PatientRow:
    """The patient in a row selected as ROW_COLUMNS."""
    return PatientRow(
        id=row[0],
        name=row[1],
        email=row[2],
        address=row[3],
        date_of_birth=row[4],
        registered_date=row[5],
        version=row[6],
    )


def cache_entry(row: Sequence[Any]) -> bytes:
    """What the cache holds for a row selected as ROW_COLUMNS: JSON, or b"" if removed."""
    return b"" if row[7] else _row_encoder.encode(patient_from_row(row))


def _details(data: PatientRegisteredV1 | PatientDetailsChangedV1) -> dict[str, Any]:
    return {
        "name": data.name,
        "email": data.email,
        "email_key": normalise_email(data.email),
        "address": data.address,
        "date_of_birth": data.date_of_birth,
    }
