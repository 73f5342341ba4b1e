"""Each patient's history: who changed which fields, and when (the `patient_history` table).

The directory projection writes one row per patient event, in the same transaction as
its other writes and just before the directory row moves on, so that a change can be
compared with the row it changes: `fields` names what the event set (registration,
preferences) or changed (details: only the fields whose value differs). `values` holds
those fields' new values, never the old ones, in one jsonb column that erasure can null.
The query API reads it through `page`; whoever may not see values gets the names only
(docs/auth.md).

An erasure keeps each row's version, position, type, time and actor, and what a
registration or a preferences change set; it nulls every personal value and the field
names of details changes (which only the values could tell). A rebuild from the store,
where the erased patient's events are unreadable, writes the same rows.

Applying is idempotent: a row is keyed by (patient, version) and never rewritten, and a
change is compared only with an older version of the directory row.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, cast
from uuid import UUID

import msgspec
import psycopg
from psycopg import sql

from domain.contracts import (
    Envelope,
    PatientDetailsChangedV1,
    PatientErasedV1,
    PatientPreferencesChangedV1,
    PatientRegisteredV3,
    Unreadable,
    registers,
)
from readmodels.directory import LIVE, Tables
from runtime.db import arrays, rendered

REGISTERED_FIELDS = ("name", "email", "address", "dateOfBirth", "registeredDate")
"""What a registration sets (the name's parts are derived from `name`, not set)."""

_DETAILS = (
    ("name", "name"),
    ("email", "email"),
    ("address", "address"),
    ("dateOfBirth", "date_of_birth"),
)
"""A details change: (field on the wire, directory column)."""

_COLUMNS = (
    "patient_id, version, position, type, occurred_at, actor_id, actor_role,"
    ' correlation_id, fields, "values"'
)


class Entry(msgspec.Struct, kw_only=True):
    """One row of a patient's history."""

    version: int
    position: int
    type: str
    occurred_at: datetime
    actor_id: str | None
    actor_role: str | None
    correlation_id: str | None
    fields: list[str]
    values: dict[str, Any] | None


class HistoryStatements:
    """The statements that write the history of `tables` (live, or a rebuild's copy)."""

    def __init__(self, tables: Tables = LIVE):
        h = sql.Identifier(tables.history)
        p = sql.Identifier(tables.patients)

        def insert(values: str) -> bytes:
            # Values are built from typed parameters, never sent as JSON text: a value
            # PostgreSQL refuses is refused before it leaves (and so never logged).
            return rendered(
                sql.SQL(
                    "INSERT INTO {h} (" + _COLUMNS + ") VALUES (%(id)s, %(version)s,"
                    " %(position)s, %(type)s, %(occurred_at)s, %(actor_id)s, %(actor_role)s,"
                    " %(correlation_id)s, %(fields)s, " + values + ")"
                    " ON CONFLICT (patient_id, version) DO NOTHING"
                ).format(h=h)
            )

        # Registrations, many in one statement: a row per element of the arrays; an erased
        # patient's (`sealed`) sets the same fields but keeps no value. Arrays of text in
        # text format, the others in binary (see `readmodels.tracking.applied_statement`).
        self._registrations = rendered(
            sql.SQL(
                "INSERT INTO {h} (" + _COLUMNS + ") SELECT id, version, position, type,"
                " occurred_at, actor_id, actor_role, correlation_id, %s::text[],"
                " CASE WHEN NOT sealed THEN jsonb_build_object('name', name, 'email', email,"
                " 'address', address, 'dateOfBirth', date_of_birth,"
                " 'registeredDate', registered_date) END"
                " FROM unnest(%b::uuid[], %b::bigint[], %b::bigint[], %s::text[],"
                " %b::timestamptz[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],"
                " %s::text[], %b::date[], %b::date[], %b::boolean[])"
                " AS g(id, version, position, type, occurred_at, actor_id, actor_role,"
                " correlation_id, name, email, address, date_of_birth, registered_date, sealed)"
                " ON CONFLICT (patient_id, version) DO NOTHING"
            ).format(h=h)
        )
        self._preferences = insert("jsonb_build_object('reminders', %(reminders)s::boolean)")
        self._nothing = insert("NULL")
        # One statement: the erasure's own row, and every earlier row of the patient wiped.
        self._erase = rendered(
            sql.SQL(
                "WITH wiped AS (UPDATE {h} SET"
                " \"values\" = CASE WHEN type = 'PatientPreferencesChanged'"
                ' THEN "values" END,'
                " fields = CASE WHEN type = 'PatientDetailsChanged' THEN '{{}}' ELSE fields END"
                " WHERE patient_id = %(id)s AND version < %(version)s)"
                " INSERT INTO {h} (" + _COLUMNS + ") VALUES (%(id)s, %(version)s,"
                " %(position)s, %(type)s, %(occurred_at)s, %(actor_id)s, %(actor_role)s,"
                " %(correlation_id)s, %(fields)s, NULL)"
                " ON CONFLICT (patient_id, version) DO NOTHING"
            ).format(h=h)
        )
        # Details changes, many in one statement: a row per element of the arrays whose
        # directory row is older, naming the fields whose value differs from that row's. A
        # patient at most once (each is compared with the row before its change), and run
        # before the directory rows are updated.
        compared = sql.SQL(
            ", ".join(
                f"('{wire}', {order}, p.{column} IS DISTINCT FROM g.{column}, to_jsonb(g.{column}))"
                for order, (wire, column) in enumerate(_DETAILS)
            )
        )
        self._changes = rendered(
            sql.SQL(
                "INSERT INTO {h} (" + _COLUMNS + ") SELECT g.id, g.version, g.position, g.type,"
                " g.occurred_at, g.actor_id, g.actor_role, g.correlation_id, c.fields, c.vals"
                " FROM unnest(%b::uuid[], %b::bigint[], %b::bigint[], %s::text[],"
                " %b::timestamptz[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[],"
                " %s::text[], %b::date[])"
                " AS g(id, version, position, type, occurred_at, actor_id, actor_role,"
                " correlation_id, name, email, address, date_of_birth)"
                " JOIN {p} p ON p.id = g.id AND p.version < g.version,"
                " LATERAL (SELECT"
                " coalesce(array_agg(f.name ORDER BY f.ord) FILTER (WHERE f.changed), '{{}}'),"
                " coalesce(jsonb_object_agg(f.name, f.value) FILTER (WHERE f.changed), '{{}}')"
                " FROM (VALUES {compared}) AS f(name, ord, changed, value)) AS c(fields, vals)"
                " ON CONFLICT (patient_id, version) DO NOTHING"
            ).format(h=h, p=p, compared=compared)
        )

    def statement(
        self, envelope: Envelope[Any], data: Any
    ) -> tuple[bytes, dict[str, Any] | list[Any]]:
        """The statement that records `envelope` in the history; run it before the
        directory's own statement for the same event (a change compares with the row)."""
        params: dict[str, Any] = {
            "id": envelope.aggregate_id,
            "version": envelope.aggregate_version,
            "position": envelope.position,
            "type": envelope.type,
            "occurred_at": envelope.occurred_at,
            "actor_id": envelope.actor_id,
            "actor_role": envelope.actor_role,
            "correlation_id": envelope.correlation_id,
        }
        if isinstance(data, PatientDetailsChangedV1):
            return self.changes([(envelope, data)])
        if registers(data):
            return self.registrations([(envelope, data)])
        if isinstance(data, PatientPreferencesChangedV1):
            reminders = {"fields": ["reminders"], "reminders": data.reminders}
            return self._preferences, params | reminders
        if isinstance(data, PatientErasedV1):
            return self._erase, params | {"fields": []}
        # A removal, an erased patient's details change (what changed cannot be told), or
        # an event of a later version the directory learns about: no field named.
        return self._nothing, params | {"fields": []}

    def registrations(self, events: Sequence[tuple[Envelope[Any], Any]]) -> tuple[bytes, list[Any]]:
        """The one statement that records registrations (each `registers`) in the history.
        An erased patient's registration (a rebuild, a late delivery) records what it set,
        without the values."""
        rows = []
        for envelope, data in events:
            row = _header(envelope)
            if isinstance(data, Unreadable):
                sealed = cast(PatientRegisteredV3, data.sealed)
                row += [None, None, None, None, sealed.registered_date, True]
            else:
                row += [
                    data.name,
                    data.email,
                    data.address,
                    data.date_of_birth,
                    data.registered_date,
                    False,
                ]
            rows.append(row)
        return self._registrations, [list(REGISTERED_FIELDS), *arrays(rows)]

    def changes(
        self, events: Sequence[tuple[Envelope[Any], PatientDetailsChangedV1]]
    ) -> tuple[bytes, list[Any]]:
        """The one statement that records details changes in the history, each compared
        with its patient's directory row: a patient at most once, and sent before the
        directory rows are updated."""
        rows = [
            [*_header(envelope), data.name, data.email, data.address, data.date_of_birth]
            for envelope, data in events
        ]
        return self._changes, arrays(rows)


def _header(envelope: Envelope[Any]) -> list[Any]:
    """An event's own columns of its history row (`_COLUMNS` up to `fields`)."""
    return [
        envelope.aggregate_id,
        envelope.aggregate_version,
        envelope.position,
        envelope.type,
        envelope.occurred_at,
        envelope.actor_id,
        envelope.actor_role,
        envelope.correlation_id,
    ]


async def page(
    conn: psycopg.AsyncConnection[Any],
    patient_id: UUID,
    after_version: int,
    limit: int,
    tables: Tables = LIVE,
) -> list[Entry]:
    """Up to `limit` entries of the patient's history after `after_version`, oldest first."""
    async with conn.cursor() as cur:
        await cur.execute(
            sql.SQL(
                "SELECT version, position, type, occurred_at, actor_id, actor_role,"
                ' correlation_id, fields, "values" FROM {} WHERE patient_id = %s'
                " AND version > %s ORDER BY version LIMIT %s"
            ).format(sql.Identifier(tables.history)),
            [patient_id, after_version, limit],
        )
        rows = await cur.fetchall()
    return [
        Entry(
            version=r[0],
            position=r[1],
            type=r[2],
            occurred_at=r[3],
            actor_id=r[4],
            actor_role=r[5],
            correlation_id=r[6],
            fields=list(r[7]),
            values=r[8],
        )
        for r in rows
    ]
