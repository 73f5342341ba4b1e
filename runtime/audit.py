"""The disclosure audit: who was shown which patients' personal data, when, and why.

Every answer that carries a patient's personal data appends one record before it goes
out, in the same request:

    await audit.disclosed(request, "patient.get", [patient_id])

The actor and role come from the request's verified token, the correlation id from the
request; the writer is the app's own (`app.state.audit`, set at startup by `open_writer`):
in the query API the spool of `runtime.audit_spool`, which appends the record to a file
the process holds and ships it into `audit.disclosures` (migration 0012) within
milliseconds. If the record cannot be written the read fails with 503 (`AuditUnavailable`,
mapped by `PROBLEMS`): nothing is ever answered unaudited. The table is append-only,
enforced by triggers in the database; `page` reads it for `GET /audit`.

A record names its patients by reference (migration 0017): each distinct list of ids
is stored once in `audit.patient_sets`, keyed by its digest, and the record carries the
digest. A page of 50 shown again and again costs one small row each time, not a list of
50 ids indexed anew; `audit.records` shows every record with its ids.
"""

from __future__ import annotations

import base64
import binascii
import getpass
import hashlib
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

import msgspec
import psycopg
import psycopg_pool
import structlog
from litestar import Request
from litestar.plugins.problem_details import ProblemDetailsException
from psycopg import sql

from runtime.http import Problems, correlation_id, problem

log = structlog.get_logger(__name__)
_encode = msgspec.json.Encoder().encode

STATE_KEY = "audit"
"""Where an app keeps its writer: `app.state.audit`."""

CLI_ROLE = "operator"
"""The role recorded for a disclosure at the command line (`carelog ... --reveal`)."""

UNAUDITED = {503: "A dependency is unavailable, or the disclosure audit cannot be written"}
"""`Documented(problems=...)` of a route that audits: nothing is shown unaudited."""


class AuditUnavailable(Exception):
    """The audit record could not be written, so the personal data is not shown."""


@dataclass(frozen=True)
class Disclosure:
    """One answer that showed personal data: who, with which role, what, whose, which request."""

    actor: str
    role: str
    operation: str
    patient_ids: tuple[UUID, ...]
    correlation_id: str


class Writer(Protocol):
    async def start(self) -> None:
        """Opens what it writes to (at the app's startup, once its pool is open)."""

    async def record(self, disclosure: Disclosure) -> None:
        """Returns once the record is written; raises AuditUnavailable otherwise."""

    async def flush(self) -> bool:
        """Waits until the records written so far can be read back (`GET /audit`)."""

    async def close(self) -> None:
        """Lets go of what it holds (before the app's pool closes)."""


class Line(msgspec.Struct, omit_defaults=True, frozen=True):
    """One record as the spool keeps it and the INSERT takes it: `t` the time (Unix
    seconds), `a` the actor, `r` the role, `o` the operation, `d` the digest of the list
    of patients (hex), `c` the correlation id, and `p` the list's ids where the list may
    not be stored yet."""

    t: float
    a: str
    r: str
    o: str
    d: str
    c: str
    p: list[UUID] | None = None


def line_of(disclosure: Disclosure, digest: str, with_ids: bool) -> Line:
    return Line(
        time.time(),
        disclosure.actor,
        disclosure.role,
        disclosure.operation,
        digest,
        disclosure.correlation_id,
        list(disclosure.patient_ids) if with_ids else None,
    )


_LINES = (
    b"WITH lines AS MATERIALIZED (SELECT * FROM json_to_recordset(%(lines)s::json)"
    b" AS l(t float8, a text, r text, o text, d text, c text, p uuid[])),"
    b" sets AS (INSERT INTO audit.patient_sets (digest, patient_ids)"
    b" SELECT decode(d, 'hex'), p FROM lines WHERE p IS NOT NULL"
    b" ON CONFLICT (digest) DO NOTHING)"
)
_INSERT = (
    b" INSERT INTO audit.disclosures (at, actor, role, operation, patient_set, correlation_id)"
    b" SELECT to_timestamp(t), a, r, o, decode(d, 'hex'), c FROM lines"
)
RECORD_LINES = _LINES + _INSERT
"""Stores a JSON array of `Line`s (`lines`): the lists of patients they carry, then the
records, in one statement."""
SHIP_LINES = (
    _LINES + b", records AS (" + _INSERT + b")"
    b" INSERT INTO audit.spool_marks (segment, shipped) VALUES (%(segment)s, %(shipped)s)"
    b" ON CONFLICT (segment) DO UPDATE SET shipped = excluded.shipped"
)
"""`RECORD_LINES`, and how far their spool segment is stored (`segment`, `shipped`), in
one statement: all of it or none (runtime.audit_spool)."""

KNOWN_SETS = 4096
"""Lists of patients a spool segment remembers having carried (their digests)."""


def digest_of(patient_ids: tuple[UUID, ...]) -> bytes:
    """The key of a list of patients in `audit.patient_sets` (migration 0017): SHA-256 of
    the ids as a JSON array of their canonical text, in order."""
    return hashlib.sha256(_encode(patient_ids)).digest()


def check_autocommit(pool: psycopg_pool.AsyncConnectionPool[Any]) -> None:
    """A writer's statements must be committed when they return."""
    if not (isinstance(pool.kwargs, dict) and pool.kwargs.get("autocommit")):
        raise ValueError("the audit writer needs an autocommit pool (open_pool(autocommit=True))")


def open_writer(state: Any, writer: Writer) -> None:
    """Makes `writer` the app's audit writer (at startup, once its pool is open)."""
    state[STATE_KEY] = writer


async def disclosed(
    request: Request[Any, Any, Any], operation: str, patient_ids: Iterable[UUID]
) -> None:
    """Records that this request's answer shows these patients' personal data (each id
    once), before it goes out; raises AuditUnavailable (503) when that cannot be done."""
    writer: Writer | None = request.app.state.get(STATE_KEY)
    if writer is None:
        raise AuditUnavailable("no audit writer")
    claims = request.state.claims
    await writer.record(
        Disclosure(
            actor=claims.subject,
            role=str(claims.role),
            operation=operation,
            patient_ids=tuple(patient_ids),
            correlation_id=correlation_id(request.scope),
        )
    )


def record_now(database_url: str, disclosure: Disclosure) -> None:
    """Writes one disclosure at once, blocking, committed (the CLI, before it reveals
    anything); raises AuditUnavailable when it cannot."""
    line = line_of(disclosure, digest_of(disclosure.patient_ids).hex(), with_ids=True)
    try:
        with psycopg.connect(database_url, connect_timeout=10, autocommit=True) as conn:
            conn.execute(RECORD_LINES, {"lines": (b"[" + _encode(line) + b"]").decode()})
    except psycopg.Error as exc:
        raise AuditUnavailable(type(exc).__name__) from None


def at_the_command_line(operation: str, patient_ids: Iterable[UUID]) -> Disclosure:
    """A disclosure by the operator running this process (`carelog ... --reveal`): the
    actor is `os:<user>`, with a correlation id of its own."""
    return Disclosure(
        actor=f"os:{getpass.getuser()}",
        role=CLI_ROLE,
        operation=operation,
        patient_ids=tuple(dict.fromkeys(patient_ids)),
        correlation_id=str(uuid.uuid4()),
    )


def _unavailable(exc: AuditUnavailable) -> ProblemDetailsException:
    return problem(
        503,
        "the disclosure audit cannot be written, so nothing is shown; retry shortly",
        headers={"Retry-After": "1"},
    )


PROBLEMS: Problems = {AuditUnavailable: _unavailable}


# --- Reading: GET /audit -----------------------------------------------------------------


class Record(msgspec.Struct, rename="camel", kw_only=True):
    """One disclosure as `GET /audit` shows it."""

    id: int
    at: datetime
    actor_id: str
    role: str
    operation: str
    patient_ids: list[UUID]
    correlation_id: str


@dataclass(frozen=True)
class AuditQuery:
    patient_id: UUID | None = None
    actor_id: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    limit: int = 50
    before: int | None = None
    """The last id of the previous page (newest first: this page is older)."""


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(f"d:{last_id}".encode()).rstrip(b"=").decode()


def decode_cursor(raw: str) -> int | None:
    """The id a cursor of `encode_cursor` carries; None if it is not one."""
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    number = text.removeprefix("d:")
    if not text.startswith("d:") or not number.isdigit() or len(number) > 18:
        return None
    return int(number)


_FILTERS = {
    # Records before migration 0017 hold their ids; later ones, their list's digest.
    "patient": "(d.patient_ids @> ARRAY[%(patient)s]::uuid[] OR d.patient_set = ANY(ARRAY("
    "SELECT digest FROM audit.patient_sets WHERE patient_ids @> ARRAY[%(patient)s]::uuid[])))",
    "actor": "d.actor = %(actor)s",
    "start": "d.at >= %(start)s",
    "end": "d.at < %(end)s",
    "before": "d.id < %(before)s",
}


async def page(conn: psycopg.AsyncConnection[Any], query: AuditQuery) -> tuple[list[Record], bool]:
    """One page of disclosures, newest first, and whether older ones follow."""
    values = {
        "patient": query.patient_id,
        "actor": query.actor_id,
        "start": query.start,
        "end": query.end,
        "before": query.before,
    }
    where = ["TRUE", *(f for name, f in _FILTERS.items() if values[name] is not None)]
    statement = sql.SQL(
        "SELECT d.id, d.at, d.actor, d.role, d.operation,"
        " coalesce(d.patient_ids, s.patient_ids), d.correlation_id"
        " FROM audit.disclosures d LEFT JOIN audit.patient_sets s ON s.digest = d.patient_set"
        " WHERE {} ORDER BY d.id DESC LIMIT %(limit)s"
    ).format(sql.SQL(" AND ").join(sql.SQL(w) for w in where))
    cursor = await conn.execute(statement, {**values, "limit": query.limit + 1})
    rows = await cursor.fetchall()
    records = [
        Record(
            id=r[0],
            at=r[1],
            actor_id=r[2],
            role=r[3],
            operation=r[4],
            patient_ids=r[5],
            correlation_id=r[6],
        )
        for r in rows[: query.limit]
    ]
    return records, len(rows) > query.limit
