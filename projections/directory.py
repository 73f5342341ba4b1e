"""The patient directory: a PostgreSQL read model of current patients.

Applying is idempotent. Each row keeps the aggregate version it reflects, and an
event is applied only over an older version, so redelivery, restarts, rebalances
and replays never apply anything twice. The rows, each patient's history
(`readmodels.history`: who changed which fields, when) and the projection's
tracking record are written in one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import psycopg
from psycopg import sql

from domain.contracts import (
    Envelope,
    PatientDetailsChangedV1,
    PatientDetailsChangedV2,
    PatientErasedV1,
    PatientPreferencesChangedV1,
    PatientRegisteredV2,
    PatientRegisteredV3,
    PatientRemovedV1,
    Unreadable,
)
from domain.patients import normalise_email, split_name
from readmodels.directory import COLUMNS, LIVE, NAME, Tables, records
from readmodels.history import HistoryStatements
from readmodels.swaps import applying
from readmodels.tracking import applied_params, applied_statement, track_statement
from runtime.consumers import UnappliableEvent
from runtime.db import rendered


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
        self._register = rendered(
            sql.SQL(
                "INSERT INTO {p} (id, version, position, name, name_key, email, email_key, address,"
                " date_of_birth, registered_date, removed, given_name, family_name)"
                " VALUES (%(id)s, %(version)s, %(position)s, %(name)s, lower(%(name)s), %(email)s,"
                " %(email_key)s, %(address)s, %(date_of_birth)s, %(registered_date)s, false,"
                " %(given_name)s, %(family_name)s)"
                " ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version,"
                " position = EXCLUDED.position, name = EXCLUDED.name, name_key = EXCLUDED.name_key,"
                " given_name = EXCLUDED.given_name, family_name = EXCLUDED.family_name,"
                " email = EXCLUDED.email, email_key = EXCLUDED.email_key,"
                " address = EXCLUDED.address, date_of_birth = EXCLUDED.date_of_birth,"
                " registered_date = EXCLUDED.registered_date,"
                " removed = false, updated_at = now()"
                " WHERE {p}.version < EXCLUDED.version"
                " RETURNING id"
            ).format(p=p)
        )
        self._change = rendered(
            sql.SQL(
                "UPDATE {p} SET version = %(version)s, position = %(position)s, name = %(name)s,"
                " name_key = lower(%(name)s), given_name = %(given_name)s,"
                " family_name = %(family_name)s, email = %(email)s, email_key = %(email_key)s,"
                " address = %(address)s, date_of_birth = %(date_of_birth)s, updated_at = now()"
                " WHERE id = %(id)s AND version < %(version)s"
                " RETURNING id"
            ).format(p=p)
        )
        self._remove = rendered(
            sql.SQL(
                "UPDATE {p} SET version = %(version)s, position = %(position)s, removed = true,"
                " updated_at = now() WHERE id = %(id)s AND version < %(version)s RETURNING id"
            ).format(p=p)
        )
        self._touch = rendered(
            sql.SQL(
                "UPDATE {p} SET version = %(version)s, position = %(position)s, updated_at = now()"
                " WHERE id = %(id)s AND version < %(version)s RETURNING id"
            ).format(p=p)
        )
        # An erased patient's row: a tombstone with nothing personal left in it.
        blank = (
            " name = '', name_key = '', given_name = NULL, family_name = NULL, email = '',"
            " email_key = '', address = '', date_of_birth = NULL, removed = true, erased = true,"
            " updated_at = now()"
        )
        self._erase = rendered(
            sql.SQL(
                "UPDATE {p} SET version = %(version)s, position = %(position)s,"
                + blank
                + " WHERE id = %(id)s AND version < %(version)s RETURNING id"
            ).format(p=p)
        )
        self._register_erased = rendered(
            sql.SQL(
                "INSERT INTO {p} (id, version, position, name, name_key, email, email_key, address,"
                " date_of_birth, registered_date, removed, erased)"
                " VALUES (%(id)s, %(version)s, %(position)s, '', '', '', '', '', NULL,"
                " %(registered_date)s, true, true)"
                " ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version,"
                " position = EXCLUDED.position,"
                + blank
                + " WHERE {p}.version < EXCLUDED.version RETURNING id"
            ).format(p=p)
        )
        self._exists = rendered(sql.SQL("SELECT 1 FROM {p} WHERE id = %s").format(p=p))
        self._current = rendered(
            sql.SQL("SELECT {c} FROM {p} WHERE id = ANY(%s)").format(c=COLUMNS, p=p)
        )
        self._applied = applied_statement(tables.positions, "patient_id")
        self._track = track_statement(tables.tracking)
        self.history = HistoryStatements(tables)

    async def apply(
        self, conn: psycopg.AsyncConnection[Any], batch: Sequence[tuple[Envelope[Any], Any]]
    ) -> Outcome:
        """Applies decoded events in one transaction; returns what changed."""
        applied = duplicates = 0
        touched: set[UUID] = set()
        position = 0
        async with conn.transaction(), conn.cursor() as cur:
            await applying(cur, self.name)
            # One round trip for the whole batch: every statement is sent in a pipeline,
            # then each result is read (the statements still run in order).
            sent: list[tuple[Envelope[Any], psycopg.AsyncCursor[Any]]] = []
            async with conn.pipeline():
                for envelope, data in batch:
                    position = max(position, envelope.position)
                    statement, params = self._statement(envelope, data)
                    # The history row first: a change is compared with the row it changes.
                    await conn.execute(*self.history.statement(envelope, data))
                    one = conn.cursor()
                    await one.execute(statement, params)
                    sent.append((envelope, one))
            for envelope, one in sent:
                found = await one.fetchone()
                await one.close()
                if found is None:
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
            await cur.execute(
                self._applied, applied_params((e.position, e.aggregate_id) for e, _ in batch)
            )
            await cur.execute(self._track, [self.name, position, applied])
            async with conn.cursor(row_factory=records) as rows:
                changed = await self._rows(rows, touched)
        return Outcome(applied, duplicates, changed, position)

    def _statement(self, envelope: Envelope[Any], data: Any) -> tuple[bytes, dict[str, Any]]:
        params = {
            "id": envelope.aggregate_id,
            "version": envelope.aggregate_version,
            "position": envelope.position,
        }
        if isinstance(data, PatientRegisteredV2):
            return self._register, params | _details(data) | {
                "registered_date": data.registered_date,
                "given_name": data.given_name,
                "family_name": data.family_name,
            }
        if isinstance(data, PatientDetailsChangedV1):
            return self._change, params | _details(data)
        if isinstance(data, PatientRemovedV1):
            return self._remove, params
        if isinstance(data, PatientPreferencesChangedV1):
            return self._touch, params  # nothing shown changes; the version moves on
        if isinstance(data, PatientErasedV1):
            return self._erase, params
        # An erased patient's earlier events (a rebuild, or a late delivery): keep nothing.
        if isinstance(data, Unreadable) and isinstance(data.sealed, PatientRegisteredV3):
            return self._register_erased, params | {"registered_date": data.sealed.registered_date}
        if isinstance(data, Unreadable) and isinstance(data.sealed, PatientDetailsChangedV2):
            return self._erase, params
        raise UnappliableEvent(f"{envelope.type} is not a patient event")

    async def _rows(
        self, cur: psycopg.AsyncCursor[Any], ids: set[UUID]
    ) -> list[tuple[str, int, bytes]]:
        if not ids:
            return []
        await cur.execute(self._current, [list(ids)])
        return [(str(r.id), r.version, r.cache_entry()) for r in await cur.fetchall()]


def _details(data: PatientRegisteredV2 | PatientDetailsChangedV1) -> dict[str, Any]:
    given, family = split_name(data.name)
    return {
        "given_name": given,
        "family_name": family,
        "name": data.name,
        "email": data.email,
        "email_key": normalise_email(data.email),
        "address": data.address,
        "date_of_birth": data.date_of_birth,
    }
