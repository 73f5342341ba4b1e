"""What every read model keeps beside its rows: the global positions it has applied
(for read-your-writes and rebuilds) and its tracking record, written in the same
transaction as the rows."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from psycopg import sql

from runtime.db import rendered

T = TypeVar("T")


async def reached(conn: psycopg.AsyncConnection[Any], positions: str, position: int) -> bool:
    """Whether the read model whose positions table this is has applied that event."""
    cur = await conn.execute(
        sql.SQL("SELECT 1 FROM {} WHERE position = %s").format(sql.Identifier(positions)),
        [position],
    )
    return await cur.fetchone() is not None


def applied_statement(positions: str, aggregate_column: str = "aggregate_id") -> bytes:
    """Records a batch's applied positions in one statement: parameters (the positions, the
    aggregate ids), two lists of one length (`applied_params`).

    Arrays of numbers, ids, dates and flags are sent in binary (`%b`), which psycopg dumps
    without quoting each element; arrays of text stay in text format (`%s`), where a NUL
    in a value is refused before it leaves."""
    return rendered(
        sql.SQL(
            "INSERT INTO {} (position, {}) SELECT * FROM unnest(%b::bigint[], %b::uuid[])"
            " ON CONFLICT DO NOTHING"
        ).format(sql.Identifier(positions), sql.Identifier(aggregate_column))
    )


def applied_params(events: Iterable[tuple[int, UUID]]) -> list[list[Any]]:
    """`applied_statement`'s parameters for (position, aggregate id) pairs; no statement is
    needed if the lists are empty."""
    positions: list[Any] = []
    ids: list[Any] = []
    for position, aggregate_id in events:
        positions.append(position)
        ids.append(aggregate_id)
    return [positions, ids]


def track_statement(tracking: str) -> bytes:
    """Moves a projection's tracking record on: parameters (projection, position, applied)."""
    return rendered(
        sql.SQL(
            "INSERT INTO {t} (projection, position, applied) VALUES (%s, %s, %s)"
            " ON CONFLICT (projection) DO UPDATE SET"
            " position = GREATEST({t}.position, EXCLUDED.position),"
            " applied = {t}.applied + EXCLUDED.applied, updated_at = now()"
        ).format(t=sql.Identifier(tracking))
    )


def suffixed(tables: T, suffix: str) -> T:
    """The same tables named `<table><suffix>` (a copy beside the live ones); the tracking
    table, shared by every projection, keeps its name."""
    return dataclasses.replace(  # type: ignore[type-var]
        tables,
        **{
            f.name: getattr(tables, f.name) + suffix
            for f in dataclasses.fields(tables)  # type: ignore[arg-type]
            if f.name != "tracking"
        },
    )
