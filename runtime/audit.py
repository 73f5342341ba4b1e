"""The disclosure audit: who was shown which patients' personal data, when, and why.

Every answer that carries a patient's personal data appends one record to
`audit.disclosures` (migration 0012) before it goes out, in the same request:

    await audit.disclosed(request, "patient.get", [patient_id])

The actor and role come from the request's verified token, the correlation id from the
request; the writer is the app's own (`app.state.audit`, set at startup by `open_writer`).
If the record cannot be written the read fails with 503 (`AuditUnavailable`, mapped by
`PROBLEMS`): nothing is ever answered unaudited. The table is append-only, enforced by
triggers in the database; `page` reads it for `GET /audit`.

Writes are grouped: one INSERT is in flight at a time; the records of the requests that
arrive meanwhile wait and go together in the next one, and each request answers only
once the INSERT holding its record has returned (and so is committed). A request that
finds no INSERT in flight writes its record itself. (One at a time measured best, in
both CPU and latency, against two and four: each commit costs PostgreSQL about 100 us
of CPU, and bigger batches share it.)

A record names its patients by reference (migration 0017): each distinct list of ids
is stored once in `audit.patient_sets`, keyed by its digest, and the record carries the
digest. A page of 50 shown again and again costs one small row each time, not a list of
50 ids indexed anew; `audit.records` shows every record with its ids.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import getpass
import hashlib
import uuid
from collections import OrderedDict
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

from runtime.db import quiet
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
    async def record(self, disclosure: Disclosure) -> None:
        """Returns once the record is stored; raises AuditUnavailable otherwise."""

    async def close(self) -> None:
        """Lets go of what it holds (before the app's pool closes)."""


_RECORDS = (
    b"INSERT INTO audit.disclosures (actor, role, operation, patient_set, correlation_id)"
    b" SELECT a, r, o, decode(d, 'hex'), c"
    b" FROM json_to_recordset(%s::json) AS t(a text, r text, o text, d text, c text)"
)
_WITH_SETS = (
    b"WITH sets AS (INSERT INTO audit.patient_sets (digest, patient_ids)"
    b" SELECT decode(d, 'hex'), p FROM json_to_recordset(%s::json) AS s(d text, p uuid[])"
    b" ON CONFLICT (digest) DO NOTHING) " + _RECORDS
)
# Two constant statements, each prepared once per connection: the records alone, and the
# records with lists of patients their connection has not stored yet. A batch travels as
# one JSON parameter (msgspec writes it at once; psycopg would dump an array per column).

KNOWN_SETS = 4096
"""Lists of patients each connection remembers having stored (32-byte digests)."""


def digest_of(patient_ids: tuple[UUID, ...]) -> bytes:
    """The key of a list of patients in `audit.patient_sets` (migration 0017): SHA-256 of
    the ids as a JSON array of their canonical text, in order."""
    return hashlib.sha256(_encode(patient_ids)).digest()


class _Known:
    """The lists one connection has stored: sent again only after it is gone (a new
    connection, to a database that may have been restored, knows none)."""

    def __init__(self) -> None:
        self.digests: OrderedDict[bytes, None] = OrderedDict()

    def missing(self, batch: list[Disclosure], digests: list[bytes]) -> dict[bytes, list[UUID]]:
        """The lists of the batch this connection has not stored, by digest."""
        missing: dict[bytes, list[UUID]] = {}
        for d, digest in zip(batch, digests, strict=True):
            if digest in self.digests:
                self.digests.move_to_end(digest)
            else:
                missing[digest] = list(d.patient_ids)
        return missing

    def stored(self, digests: Iterable[bytes]) -> None:
        for digest in digests:
            self.digests[digest] = None
        while len(self.digests) > KNOWN_SETS:
            self.digests.popitem(last=False)


def _statement(batch: list[Disclosure], known: _Known) -> tuple[bytes, list[str], list[bytes]]:
    """The INSERT of a batch, its parameters, and the lists of patients it stores."""
    digests = [digest_of(d.patient_ids) for d in batch]
    missing = known.missing(batch, digests)
    records = _encode(
        [
            {"a": d.actor, "r": d.role, "o": d.operation, "d": digest.hex(), "c": d.correlation_id}
            for d, digest in zip(batch, digests, strict=True)
        ]
    ).decode()
    if not missing:
        return _RECORDS, [records], []
    lists = _encode([{"d": digest.hex(), "p": ids} for digest, ids in missing.items()]).decode()
    return _WITH_SETS, [lists, records], list(missing)


class _Line:
    """A connection the writer holds between INSERTs, with its cursor and the lists of
    patients it has stored."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]):
        self.conn = conn
        self.cursor = conn.cursor()
        self.known = _Known()


_LEAD = object()
"""What a waiting record's future is given when its request is to write the records
waiting (its own among them): the INSERT that finished passes its turn on."""

Waiting = list[tuple[Disclosure, "asyncio.Future[object] | None"]]


class GroupedWriter:
    """Writes disclosures through `pool`: up to `parallel` INSERTs at once, each taking
    every record waiting when it starts. The pool is autocommit: a request is answered
    once the INSERT holding its record has returned, so that INSERT must be committed
    by then.

    A request whose record finds an INSERT free writes it itself, in its own task, with
    the records of the requests handled in the same pass of the event loop: no task is
    started and no future awaited for it, and its request goes on as soon as the INSERT
    returns. A record that finds every INSERT taken (or one forming) waits; when an
    INSERT finishes, it hands its turn to the first waiting request, which writes every
    record waiting then.

    The writer keeps the connections of its INSERTs (up to `parallel`) between them, each
    with its cursor; one the server has spoken on since (a restart, say) goes back to the
    pool, which checks it, and another is taken. `close` gives them back.
    """

    def __init__(self, pool: psycopg_pool.AsyncConnectionPool[Any], parallel: int = 1):
        if not (isinstance(pool.kwargs, dict) and pool.kwargs.get("autocommit")):
            raise ValueError(
                "the audit writer needs an autocommit pool (open_pool(autocommit=True))"
            )
        self.pool = pool
        self.parallel = parallel
        self._waiting: Waiting = []
        self._writing = 0
        self._forming = False
        self._lines: list[_Line] = []

    async def record(self, disclosure: Disclosure) -> None:
        if self._writing < self.parallel and not self._forming:
            self._writing += 1
            self._forming = True
            try:
                # One pass of the loop: the records of the requests it handles join
                # this INSERT instead of each starting one of their own.
                await asyncio.sleep(0)
            except asyncio.CancelledError:
                self._pass_turn()
                raise
            finally:
                self._forming = False
            await self._write([(disclosure, None), *self._take_waiting()])
            return
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._waiting.append((disclosure, done))
        try:
            turn = await done
        except asyncio.CancelledError:
            if done.done() and not done.cancelled() and done.result() is _LEAD:
                self._pass_turn()  # given the turn as it was cancelled: pass it on
            raise
        if turn is _LEAD:
            await self._write([(disclosure, None), *self._take_waiting()])

    def _take_waiting(self) -> Waiting:
        """Every record still waiting for an INSERT: not those given a turn of their own
        (they write their own), nor those whose requests were cancelled."""
        batch: Waiting = [(d, f) for d, f in self._waiting if f is not None and not f.done()]
        self._waiting = []
        return batch

    async def _write(self, batch: Waiting) -> None:
        """Writes `batch` in this task, holding one of the `parallel` turns, and then
        passes the turn on. Raises AuditUnavailable for the record of this task (the one
        without a future); settles every other's future."""
        line: _Line | None = None
        try:
            line = await self._line()
            statement, params, lists = _statement([d for d, _ in batch], line.known)
            await line.cursor.execute(statement, params)
            line.known.stored(lists)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            log.error("disclosure audit not written", error=type(exc).__name__)
            await self._give_back(line)
            failure = AuditUnavailable(type(exc).__name__)
            _settle(batch, failure)
            raise failure from None
        except BaseException:
            # Cancelled mid-INSERT (the app stopping, say): whether it landed is unknown.
            # The connection goes, and the others' records wait for the next INSERT: a
            # record may be stored twice, never answered unstored.
            await self._give_back(line)
            self._waiting[:0] = [(d, f) for d, f in batch if f is not None and not f.done()]
            raise
        else:
            self._lines.append(line)
            _settle(batch, None)
        finally:
            self._pass_turn()

    def _pass_turn(self) -> None:
        """Gives this turn to the first request still waiting, or frees it."""
        while self._waiting:
            _, first = self._waiting[0]
            if first is not None and not first.done():
                first.set_result(_LEAD)
                return
            self._waiting.pop(0)  # its request was cancelled
        self._writing -= 1

    async def _line(self) -> _Line:
        while self._lines:
            line = self._lines.pop()
            if quiet(line.conn):
                return line
            await self._give_back(line)  # the pool checks it, and keeps it or not
        return _Line(await self.pool.getconn())

    async def _give_back(self, line: _Line | None) -> None:
        if line is not None:
            with contextlib.suppress(Exception):
                await self.pool.putconn(line.conn)

    async def close(self) -> None:
        """Gives the connections it holds back to the pool (before the pool closes)."""
        lines, self._lines = self._lines, []
        for line in lines:
            await self._give_back(line)


def _settle(batch: Waiting, failure: BaseException | None) -> None:
    for _, done in batch:
        if done is not None and not done.done():  # a waiter whose request was cancelled
            if failure is None:
                done.set_result(None)
            else:
                done.set_exception(failure)


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
    """Writes one disclosure at once, blocking (the CLI, before it reveals anything);
    raises AuditUnavailable when it cannot."""
    try:
        with psycopg.connect(database_url, connect_timeout=10) as conn:
            statement, params, _ = _statement([disclosure], _Known())
            conn.execute(statement, params)
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
