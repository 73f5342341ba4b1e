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
from typing import Any, cast
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
    registers,
)
from domain.patients import normalise_email, split_name
from readmodels.directory import COLUMNS, LIVE, NAME, Tables, records
from readmodels.history import HistoryStatements
from readmodels.swaps import applying
from readmodels.tracking import applied_params, applied_statement, track_statement
from runtime.consumers import UnappliableEvent
from runtime.db import arrays, rendered


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
        # Registrations, many in one statement (`_register_many`): a row per element of the
        # arrays, a patient at most once (a statement cannot change one row twice). An erased
        # patient's registration (`erased`; a rebuild, or a late delivery) keeps nothing
        # personal: blank fields and, over an older row, its registered date. Arrays of
        # text in text format, the others in binary (see `applied_statement`).
        self._registrations = rendered(
            sql.SQL(
                "INSERT INTO {p} (id, version, position, name, name_key, email, email_key, address,"
                " date_of_birth, registered_date, removed, erased, given_name, family_name)"
                " SELECT id, version, position, name, lower(name), email, email_key, address,"
                " date_of_birth, registered_date, erased, erased, given_name, family_name"
                " FROM unnest(%b::uuid[], %b::bigint[], %b::bigint[], %s::text[], %s::text[],"
                " %s::text[], %s::text[], %b::date[], %b::date[], %s::text[], %s::text[],"
                " %b::boolean[]) AS g(id, version, position, name, email, email_key, address,"
                " date_of_birth, registered_date, given_name, family_name, erased)"
                " ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version,"
                " position = EXCLUDED.position, name = EXCLUDED.name, name_key = EXCLUDED.name_key,"
                " given_name = EXCLUDED.given_name, family_name = EXCLUDED.family_name,"
                " email = EXCLUDED.email, email_key = EXCLUDED.email_key,"
                " address = EXCLUDED.address, date_of_birth = EXCLUDED.date_of_birth,"
                " registered_date = CASE WHEN EXCLUDED.erased THEN {p}.registered_date"
                " ELSE EXCLUDED.registered_date END,"
                " removed = EXCLUDED.removed, erased = {p}.erased OR EXCLUDED.erased,"
                " updated_at = now()"
                " WHERE {p}.version < EXCLUDED.version"
                " RETURNING id"
            ).format(p=p)
        )
        # Details changes, many in one statement (`_change_many`): a row per element of the
        # arrays, a patient at most once (a statement cannot change one row twice).
        self._changes = rendered(
            sql.SQL(
                "UPDATE {p} AS p SET version = g.version, position = g.position, name = g.name,"
                " name_key = lower(g.name), given_name = g.given_name,"
                " family_name = g.family_name, email = g.email, email_key = g.email_key,"
                " address = g.address, date_of_birth = g.date_of_birth, updated_at = now()"
                " FROM unnest(%b::uuid[], %b::bigint[], %b::bigint[], %s::text[], %s::text[],"
                " %s::text[], %s::text[], %s::text[], %s::text[], %b::date[])"
                " AS g(id, version, position, name, given_name, family_name, email, email_key,"
                " address, date_of_birth)"
                " WHERE p.id = g.id AND p.version < g.version"
                " RETURNING p.id"
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
            # then each result is read (the statements still run in order). Registrations
            # met one after another (most of a batch under load) go as one statement for
            # their history rows and one for their directory rows; so do details changes
            # met one after another, a patient at most once in a run (each is compared with
            # the row before its change, and a statement cannot change one row twice). A run
            # is sent before the next event of another kind, so order is kept. `sent` holds
            # each statement's events, its cursor, and whether they are registrations.
            sent: list[tuple[list[Envelope[Any]], psycopg.AsyncCursor[Any], bool]] = []
            run: list[tuple[Envelope[Any], Any]] = []
            changes: dict[UUID, tuple[Envelope[Any], PatientDetailsChangedV1]] = {}

            async def register() -> None:
                if run:
                    one = await self._register_many(conn, run)
                    sent.append(([e for e, _ in run], one, True))
                    run.clear()

            async def change() -> None:
                if changes:
                    one = await self._change_many(conn, list(changes.values()))
                    sent.append(([e for e, _ in changes.values()], one, False))
                    changes.clear()

            async with conn.pipeline():
                for envelope, data in batch:
                    position = max(position, envelope.position)
                    if registers(data):
                        await change()
                        run.append((envelope, data))
                        continue
                    await register()  # what came before applies first
                    if isinstance(data, PatientDetailsChangedV1):
                        if envelope.aggregate_id in changes:
                            await change()  # the patient again: after its earlier change
                        changes[envelope.aggregate_id] = (envelope, data)
                        continue
                    await change()
                    statement, params = self._statement(envelope, data)
                    # The history row first: a change is compared with the row it changes.
                    await conn.execute(*self.history.statement(envelope, data))
                    one = conn.cursor()
                    await one.execute(statement, params)
                    sent.append(([envelope], one, False))
                await register()
                await change()
            for envelopes, one, registrations in sent:
                written = {row[0] for row in await one.fetchall()}
                await one.close()
                for envelope in envelopes:
                    touched.add(envelope.aggregate_id)
                    if envelope.aggregate_id in written:
                        written.discard(envelope.aggregate_id)  # a patient twice: applied once
                        applied += 1
                        continue
                    # A registration not written met its patient's row: a duplicate. Any
                    # other event may be for a patient the directory has never seen.
                    if not registrations:
                        await cur.execute(self._exists, [envelope.aggregate_id])
                        if await cur.fetchone() is None:
                            raise UnappliableEvent(
                                f"{envelope.type} v{envelope.aggregate_version} for a patient"
                                " the directory has never seen"
                            )
                    duplicates += 1
            await cur.execute(
                self._applied, applied_params((e.position, e.aggregate_id) for e, _ in batch)
            )
            await cur.execute(self._track, [self.name, position, applied])
            async with conn.cursor(row_factory=records) as rows:
                changed = await self._rows(rows, touched)
        return Outcome(applied, duplicates, changed, position)

    async def _register_many(
        self, conn: psycopg.AsyncConnection[Any], run: Sequence[tuple[Envelope[Any], Any]]
    ) -> psycopg.AsyncCursor[Any]:
        """Sends the statements of consecutive registrations (in a pipeline): their history
        rows, then their directory rows; the cursor returns the ids of the rows written."""
        # A patient twice in the run (a redelivery) is written for its first only.
        first: dict[UUID, tuple[Envelope[Any], Any]] = {}
        for envelope, data in run:
            first.setdefault(envelope.aggregate_id, (envelope, data))
        once = list(first.values())
        await conn.execute(*self.history.registrations(once))
        rows = []
        for envelope, data in once:
            row: list[Any] = [envelope.aggregate_id, envelope.aggregate_version, envelope.position]
            if isinstance(data, PatientRegisteredV2):
                row += [
                    data.name,
                    data.email,
                    normalise_email(data.email),
                    data.address,
                    data.date_of_birth,
                    data.registered_date,
                    data.given_name,
                    data.family_name,
                    False,
                ]
            else:  # an erased patient's: nothing personal kept
                sealed = cast(PatientRegisteredV3, data.sealed)
                row += ["", "", "", "", None, sealed.registered_date, None, None, True]
            rows.append(row)
        one = conn.cursor()
        await one.execute(self._registrations, arrays(rows))
        return one

    async def _change_many(
        self,
        conn: psycopg.AsyncConnection[Any],
        run: Sequence[tuple[Envelope[Any], PatientDetailsChangedV1]],
    ) -> psycopg.AsyncCursor[Any]:
        """Sends the statements of consecutive details changes, a patient at most once (in a
        pipeline): their history rows, compared with the rows they change, then their
        directory rows; the cursor returns the ids of the rows written."""
        await conn.execute(*self.history.changes(run))
        rows = []
        for envelope, data in run:
            given, family = split_name(data.name)
            rows.append(
                [
                    envelope.aggregate_id,
                    envelope.aggregate_version,
                    envelope.position,
                    data.name,
                    given,
                    family,
                    data.email,
                    normalise_email(data.email),
                    data.address,
                    data.date_of_birth,
                ]
            )
        one = conn.cursor()
        await one.execute(self._changes, arrays(rows))
        return one

    def _statement(self, envelope: Envelope[Any], data: Any) -> tuple[bytes, dict[str, Any]]:
        params = {
            "id": envelope.aggregate_id,
            "version": envelope.aggregate_version,
            "position": envelope.position,
        }
        if isinstance(data, PatientRemovedV1):
            return self._remove, params
        if isinstance(data, PatientPreferencesChangedV1):
            return self._touch, params  # nothing shown changes; the version moves on
        if isinstance(data, PatientErasedV1):
            return self._erase, params
        # An erased patient's earlier change (a rebuild, or a late delivery): keep nothing.
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
