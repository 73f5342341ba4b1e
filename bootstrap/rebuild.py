"""Rebuild a read model from the event store while it keeps serving: `carelog projections`.

A rebuild fills a copy of the model's tables (`<table>__next`) from the event
store's global log, in order, beside the live tables, which keep serving and
keep being projected. It works only a share of the time (`duty`, 0.25 by default)
and pauses between batches for the rest, so live reads keep their latency. Its
progress is the copy's own positions table, so after Ctrl-C or kill -9 the same
command resumes there. The analytics model's money facts come from billing's
outbox instead (`side`), refilled inside the swap transaction.

When the copy has caught up with the live position, one short transaction:
1. takes the model's lock exclusively (`readmodels.swaps`): the live projection
   finishes its batch and waits;
2. brings the copy to the live tables' position L;
3. checks that both have applied the same events up to L (else it gives the live
   projection a moment and tries again) and compares them: row counts and a
   content checksum per table;
4. renames live → `<table>__old` and copy → live, if they are equal.
Readers see the old tables or the new ones, never a mix, and wait at most for that
transaction. A mismatch swaps nothing: it names the differing rows by key, never
by content. When the projection itself changed (new columns, a fixed bug), the
differences are the point: `--allow-differences` swaps anyway and counts them.
`rollback` swaps `__old` back the same way (after bringing it level with the
events it missed); `drop-old` deletes it, `discard` an unfinished copy.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import ModuleType
from typing import Any

import anyio
import httpx
import msgspec
import psycopg
from eventsourcing.utils import get_topic
from psycopg import sql

from billing_grpc.store import SCHEMA as BILLING_SCHEMA
from commands.store import EventStore
from domain import contracts
from domain.billing import InvoiceIssuedV1
from projections import analytics as analytics_projection
from projections import appointments as appointments_projection
from projections import directory as directory_projection
from readmodels import analytics as analytics_model
from readmodels import appointments as appointments_model
from readmodels import directory as directory_model
from readmodels.swaps import swapping
from readmodels.tracking import suffixed
from runtime.cache import redis_for
from runtime.consumers import UnappliableEvent
from runtime.crypto import open_payload
from runtime.kafka import end_offsets
from runtime.settings import Settings

DEFAULT_DUTY = 0.25
"""The share of the time a rebuild works by default; it pauses the rest, so the live
model's readers and writers keep most of the machine."""

NEXT = "__next"
OLD = "__old"
BATCH = 500


@dataclass(frozen=True)
class Model:
    """A rebuildable read model: its tables, the events it reads, how to project a copy."""

    name: str
    streams: tuple[str, ...]
    """The event-store streams it is rebuilt from."""
    tables: tuple[str, ...]
    """Every table swapped together; the positions table among them."""
    positions: str
    aggregate_column: str
    """The positions table's column naming the aggregate an event changed."""
    rows: tuple[str, ...]
    """The tables whose rows (id, position) say which event each row reflects."""
    compared: dict[str, tuple[str, ...]]
    """Table → its key columns, for the tables whose content the parity check compares."""
    port: str
    group: str
    code: ModuleType
    copy: Callable[[str], Any]
    """Suffix → a projection that writes into the tables with that suffix."""
    dead_letters: str = ""
    """Its consumer's dead-letter topic, before the topic prefix."""
    side_tables: tuple[str, ...] = ()
    """Tables filled from another source than the event store (swapped and compared too)."""
    side: Callable[[psycopg.AsyncConnection[Any], str], Awaitable[None]] | None = None
    """Refills the side tables of a copy (suffix) from their source, inside the swap."""
    opens_sealed: bool = True
    """Whether its projection reads personal fields opened (as its consumer does)."""

    @property
    def version(self) -> str:
        """The version of the projection's code: a digest of its module's source."""
        return hashlib.sha256(inspect.getsource(self.code).encode()).hexdigest()[:12]

    @property
    def topics(self) -> list[str]:
        return [
            get_topic(cls) for cls, c in contracts.CONTRACTS.items() if c.stream in self.streams
        ]

    def dead_letter_topic(self, settings: Settings) -> str:
        return f"{settings.topic(self.dead_letters)}.dlq.{self.group}"


def _directory_copy(suffix: str) -> Any:
    tables = suffixed(directory_model.LIVE, suffix)
    return directory_projection.DirectoryProjection(tables, name=f"directory{suffix}")


def _appointments_copy(suffix: str) -> Any:
    tables = suffixed(appointments_model.LIVE, suffix)
    return appointments_projection.AppointmentsProjection(tables, name=f"appointments{suffix}")


MODELS: dict[str, Model] = {
    "directory": Model(
        name="directory",
        streams=(contracts.PATIENT_STREAM,),
        dead_letters=contracts.PATIENT_STREAM,
        tables=(
            directory_model.LIVE.patients,
            directory_model.LIVE.positions,
            directory_model.LIVE.history,
        ),
        positions=directory_model.LIVE.positions,
        aggregate_column="patient_id",
        rows=(directory_model.LIVE.patients,),
        compared={
            directory_model.LIVE.patients: ("id",),
            directory_model.LIVE.history: ("patient_id", "version"),
        },
        port="projection",
        group="carelog-directory",
        code=directory_projection,
        copy=_directory_copy,
    ),
    "appointments": Model(
        name="appointments",
        streams=(contracts.APPOINTMENT_STREAM,),
        dead_letters=contracts.APPOINTMENT_STREAM,
        opens_sealed=False,
        tables=(
            appointments_model.LIVE.appointments,
            appointments_model.LIVE.clinicians,
            appointments_model.LIVE.time_off,
            appointments_model.LIVE.positions,
        ),
        positions=appointments_model.LIVE.positions,
        aggregate_column="aggregate_id",
        rows=(appointments_model.LIVE.appointments, appointments_model.LIVE.clinicians),
        compared={
            appointments_model.LIVE.appointments: ("id",),
            appointments_model.LIVE.clinicians: ("id",),
            appointments_model.LIVE.time_off: ("clinician_id", "time_off_id"),
        },
        port="appointments",
        group="carelog-appointments",
        code=appointments_projection,
        copy=_appointments_copy,
    ),
}


def _analytics_copy(suffix: str) -> Any:
    tables = suffixed(analytics_model.LIVE, suffix)
    return analytics_projection.AnalyticsProjection(tables, name=f"analytics{suffix}")


async def _money_from_billing(conn: psycopg.AsyncConnection[Any], suffix: str) -> None:
    """The copy's money facts, from billing's outbox: every invoice and payment it has
    published (billing's events live there, not in the event store)."""
    table = sql.Identifier(analytics_model.LIVE.money + suffix)
    await conn.execute(sql.SQL("DELETE FROM {}").format(table))
    cur = await conn.execute(
        sql.SQL(
            "SELECT id, aggregate_id, aggregate_version, type, schema_version, payload, occurred_at"
            " FROM {}.outbox WHERE published_at IS NOT NULL AND type IN"
            " ('InvoiceIssued', 'PaymentRecorded') ORDER BY id"
        ).format(sql.Identifier(BILLING_SCHEMA))
    )
    rows = []
    for position, aggregate, version, kind, schema_version, payload, at in await cur.fetchall():
        data = msgspec.json.decode(
            bytes(payload), type=contracts.BY_TYPE[(kind, schema_version)].payload
        )
        invoiced = isinstance(data, InvoiceIssuedV1)
        rows.append(
            (
                contracts.event_id(aggregate, version),
                position,
                "invoiced" if invoiced else "paid",
                data.currency,  # type: ignore[attr-defined]
                data.total_minor if invoiced else data.amount_minor,  # type: ignore[attr-defined]
                at,
            )
        )
    async with conn.cursor() as insert:
        await insert.executemany(
            sql.SQL(
                "INSERT INTO {} (id, position, kind, currency, amount_minor, occurred_at)"
                " VALUES (%s, %s, %s, %s, %s, %s)"
            ).format(table),
            rows,
        )


MODELS["analytics"] = Model(
    name="analytics",
    streams=(contracts.PATIENT_STREAM, contracts.APPOINTMENT_STREAM),
    dead_letters="analytics",
    tables=(
        analytics_model.LIVE.patients,
        analytics_model.LIVE.appointments,
        analytics_model.LIVE.positions,
    ),
    positions=analytics_model.LIVE.positions,
    aggregate_column="aggregate_id",
    rows=(analytics_model.LIVE.patients, analytics_model.LIVE.appointments),
    compared={
        analytics_model.LIVE.patients: ("id",),
        analytics_model.LIVE.appointments: ("id",),
        analytics_model.LIVE.money: ("id",),
    },
    port="analytics",
    group="carelog-analytics",
    code=analytics_projection,
    copy=_analytics_copy,
    side_tables=(analytics_model.LIVE.money,),
    side=_money_from_billing,
)

_IGNORED_COLUMNS = ("updated_at",)
"""When a row was written, not what it says: never compared."""


class RebuildError(Exception):
    """The rebuild cannot go on (a message for the operator)."""


class ParityMismatch(Exception):
    """The rebuilt copy differs from the live model; nothing was swapped."""

    def __init__(self, differences: dict[str, list[str]]):
        self.differences = differences
        named = "; ".join(f"{t}: {', '.join(keys)}" for t, keys in differences.items())
        super().__init__(f"the copy differs from the live model ({named})")


@dataclass
class Report:
    model: str
    events: int = 0
    skipped: int = 0
    seconds: float = 0.0
    position: int = 0
    swapped: bool = False
    resumed_from: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    differences: dict[str, int] = field(default_factory=dict)
    copy_seconds: float = 0.0
    """Time spent reading and applying events (without creating, comparing, swapping)."""
    """Table → rows that differed (only when swapped with `allow_differences`)."""

    def as_json(self) -> str:
        rate = self.events / self.seconds if self.seconds else 0.0
        return json.dumps(self.__dict__ | {"eventsPerSecond": round(rate, 1)}, sort_keys=True)


# --- reading the store --------------------------------------------------------------------


class Log:
    """The event store's notifications of one model's stream, as (envelope, payload) pairs."""

    def __init__(self, store: EventStore, model: Model):
        self.store = store
        self.model = model
        self.topics = model.topics

    def read(self, after: int, stop: int | None, limit: int = BATCH) -> tuple[list[Any], int]:
        """Up to `limit` events after `after` (to `stop`); and the last position read."""
        notifications = self.store.recorder.select_notifications(
            after + 1, limit, stop=stop, topics=self.topics
        )
        batch = []
        for notification in notifications:
            # As the relay publishes it (sealed), then opened as a consumer opens it: an
            # erased patient's fields stay unreadable in the rebuilt model too.
            envelope = contracts.envelope_for(
                self.store.sealed_mapper.to_domain_event(notification), notification.id
            )
            if envelope is not None:
                data = envelope.data
                if self.model.opens_sealed:
                    data = open_payload(self.store.keyring, data)
                batch.append((envelope, data))
        return batch, (notifications[-1].id if notifications else after)

    def count(self, conn: psycopg.Connection[Any], after: int, upto: int | None = None) -> int:
        table = sql.Identifier(self.store.events_table)
        row = conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {} WHERE topic = ANY(%s) AND notification_id > %s"
                " AND notification_id <= %s"
            ).format(table),
            [self.topics, after, upto if upto is not None else 2**62],
        ).fetchone()
        return int(row[0]) if row else 0


# --- the copy -----------------------------------------------------------------------------


async def _exists(conn: psycopg.AsyncConnection[Any], table: str) -> bool:
    row = await (await conn.execute("SELECT to_regclass(%s) IS NOT NULL", [table])).fetchone()
    return bool(row and row[0])


async def _create_copy(conn: psycopg.AsyncConnection[Any], model: Model) -> None:
    """Empty copies of the live tables: columns, defaults, constraints and indexes."""
    async with conn.transaction():
        for table in (*model.tables, *model.side_tables):
            await conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING ALL)").format(
                    sql.Identifier(table + NEXT), sql.Identifier(table)
                )
            )


async def _max_position(conn: psycopg.AsyncConnection[Any], table: str) -> int:
    row = await (
        await conn.execute(sql.SQL("SELECT max(position) FROM {}").format(sql.Identifier(table)))
    ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


async def _unlevel(conn: psycopg.AsyncConnection[Any], model: Model, suffix: str, upto: int) -> int:
    """How many events up to `upto` one side has applied and the other has not.

    An event the copy applied that is missing from the live positions still counts as
    applied live when the aggregate's live row reflects that position or a later one
    (models projected before every position was recorded).
    """
    live, copy = sql.Identifier(model.positions), sql.Identifier(model.positions + suffix)
    key = sql.Identifier(model.aggregate_column)
    rows = sql.SQL(" UNION ALL ").join(
        sql.SQL("SELECT id, position FROM {}").format(sql.Identifier(t)) for t in model.rows
    )
    row = await (
        await conn.execute(
            sql.SQL(
                "SELECT (SELECT count(*) FROM {copy} c WHERE c.position <= %(upto)s"
                "  AND NOT EXISTS (SELECT 1 FROM {live} l WHERE l.position = c.position)"
                "  AND NOT EXISTS (SELECT 1 FROM ({rows}) r"
                "   WHERE r.id = c.{key} AND r.position >= c.position))"
                " + (SELECT count(*) FROM {live} l WHERE l.position <= %(upto)s"
                "  AND NOT EXISTS (SELECT 1 FROM {copy} c WHERE c.position = l.position))"
            ).format(copy=copy, live=live, rows=rows, key=key),
            {"upto": upto},
        )
    ).fetchone()
    return int(row[0]) if row else 0


async def _side_unlevel(conn: psycopg.AsyncConnection[Any], model: Model, suffix: str) -> int:
    """Rows one side of a side table has and the other lacks (the live consumer may not
    have caught up with the other source yet)."""
    missing = 0
    for table in model.side_tables:
        live, copy = sql.Identifier(table), sql.Identifier(table + suffix)
        row = await (
            await conn.execute(
                sql.SQL(
                    "SELECT (SELECT count(*) FROM {c} c WHERE NOT EXISTS"
                    " (SELECT 1 FROM {l} l WHERE l.id = c.id))"
                    " + (SELECT count(*) FROM {l} l WHERE NOT EXISTS"
                    " (SELECT 1 FROM {c} c WHERE c.id = l.id))"
                ).format(c=copy, l=live)
            )
        ).fetchone()
        missing += int(row[0]) if row else 0
    return missing


async def _apply(
    conn: psycopg.AsyncConnection[Any], projection: Any, batch: list[Any], report: Report
) -> None:
    try:
        await projection.apply(conn, batch)
    except UnappliableEvent:
        # As the live consumer does: apply one at a time and set aside what never applies.
        for one in batch:
            try:
                await projection.apply(conn, [one])
            except UnappliableEvent:
                report.skipped += 1


async def _catch_up(
    conn: psycopg.AsyncConnection[Any],
    log: Log,
    projection: Any,
    after: int,
    stop: int,
    report: Report,
    progress: Callable[[int], None],
    duty: float,
) -> int:
    """Applies the stream's events in (after, stop] to the copy; returns the last position."""
    while after < stop:
        started = time.monotonic()
        batch, last = await anyio.to_thread.run_sync(log.read, after, stop)
        if last == after:
            break
        if batch:
            await _apply(conn, projection, batch, report)
            report.events += len(batch)
            progress(len(batch))
        after = last
        report.copy_seconds += time.monotonic() - started
        if duty < 1.0:
            await asyncio.sleep((time.monotonic() - started) * (1 - duty) / duty)
    return after


# --- comparing ----------------------------------------------------------------------------


async def _columns(conn: psycopg.AsyncConnection[Any], table: str) -> list[str]:
    cur = await conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = %s"
        " AND table_schema = current_schema() ORDER BY ordinal_position",
        [table],
    )
    return [r[0] for r in await cur.fetchall() if r[0] not in _IGNORED_COLUMNS]


async def _checksum(
    conn: psycopg.AsyncConnection[Any], table: str, columns: list[str], key: tuple[str, ...]
) -> tuple[int, str]:
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    order = sql.SQL(", ").join(sql.Identifier(c) for c in key)
    row = await (
        await conn.execute(
            sql.SQL(
                "SELECT count(*), coalesce(md5(string_agg(md5(t::text), '' ORDER BY {o})), '')"
                " FROM (SELECT {c} FROM {t}) t"
            ).format(o=order, c=cols, t=sql.Identifier(table))
        )
    ).fetchone()
    assert row is not None
    return int(row[0]), str(row[1])


async def _differences(
    conn: psycopg.AsyncConnection[Any],
    live: str,
    copy: str,
    columns: list[str],
    key: tuple[str, ...],
) -> list[str]:
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in columns)
    keys = sql.SQL(", ").join(sql.Identifier(c) for c in key)
    cur = await conn.execute(
        sql.SQL(
            "SELECT DISTINCT {k} FROM ((SELECT {c} FROM {a} EXCEPT SELECT {c} FROM {b})"
            " UNION ALL (SELECT {c} FROM {b} EXCEPT SELECT {c} FROM {a})) d ORDER BY {k} LIMIT 20"
        ).format(k=keys, c=cols, a=sql.Identifier(live), b=sql.Identifier(copy))
    )
    return ["/".join(str(v) for v in row) for row in await cur.fetchall()]


async def _compare(
    conn: psycopg.AsyncConnection[Any],
    model: Model,
    suffix: str,
    report: Report | None,
    allow_differences: bool = False,
) -> None:
    differences: dict[str, list[str]] = {}
    for table, key in model.compared.items():
        columns = await _columns(conn, table)
        live = await _checksum(conn, table, columns, key)
        copy = await _checksum(conn, table + suffix, columns, key)
        if report is not None:
            report.rows[table] = copy[0]
        if live != copy:
            differences[table] = await _differences(conn, table, table + suffix, columns, key)
    if differences and report is not None:
        report.differences = {t: len(keys) for t, keys in differences.items()}
    if differences and not allow_differences:
        raise ParityMismatch(differences)


async def _swap(conn: psycopg.AsyncConnection[Any], model: Model, suffix: str) -> None:
    """The copy (table+suffix) becomes live, and live becomes table+__old, for every table."""

    async def rename(old: str, new: str) -> None:
        await conn.execute(
            sql.SQL("ALTER TABLE {} RENAME TO {}").format(sql.Identifier(old), sql.Identifier(new))
        )

    for table in (*model.tables, *model.side_tables):
        await rename(table, table + "__swapping")
        await rename(table + suffix, table)
        await rename(table + "__swapping", table + OLD)


async def _level_and_swap(
    settings: Settings,
    conn: psycopg.AsyncConnection[Any],
    log: Log,
    model: Model,
    suffix: str,
    report: Report,
    progress: Callable[[int], None],
    attempts: int = 150,
    allow_differences: bool = False,
) -> int:
    """The swap transaction, retried until the live tables are level with themselves."""
    projection = model.copy(suffix)
    for _ in range(attempts):
        async with conn.transaction():
            await swapping(conn, model.name)
            live_at = await _max_position(conn, model.positions)
            copy_at = await _max_position(conn, model.positions + suffix)
            if copy_at <= live_at:
                copy_at = await _catch_up(
                    conn, log, projection, copy_at, live_at, report, progress, duty=1.0
                )
            level = await _unlevel(conn, model, suffix, live_at) == 0
            if level and model.side is not None:
                await model.side(conn, suffix)
                level = await _side_unlevel(conn, model, suffix) == 0
            if level and copy_at <= live_at:
                await _compare(conn, model, suffix, report, allow_differences)
                await _swap(conn, model, suffix)
                await conn.execute(
                    "DELETE FROM projection_tracking WHERE projection = %s",
                    [f"{model.name}{suffix}"],
                )
                report.position = live_at
                return live_at
        # The live projection has not applied everything up to its own newest position
        # yet (a partition behind), or has just moved on: let it, then try again.
        await asyncio.sleep(0.1)
    raise RebuildError(
        "the live model did not settle long enough to compare; is its projection running?"
    )


async def _forget_cache(settings: Settings, model: Model) -> None:
    if model.name != "directory":
        return
    redis = redis_for(settings)
    try:
        await directory_model.forget_cached(
            directory_model.DirectoryCache(redis, prefix=settings.cache_prefix)
        )
    finally:
        await redis.aclose()


# --- commands -----------------------------------------------------------------------------


def model_named(name: str) -> Model:
    try:
        return MODELS[name]
    except KeyError:
        raise RebuildError(f"no read model named {name!r}: one of {', '.join(MODELS)}") from None


async def rebuild(
    settings: Settings,
    store: EventStore,
    name: str,
    *,
    progress: Callable[[int, int], Callable[[int], None]],
    dry_run: bool = False,
    confirm: Callable[[str], bool] = lambda _: True,
    duty: float = DEFAULT_DUTY,
    allow_differences: bool = False,
) -> Report:
    """Builds the copy (or resumes it), levels it with the live model, compares, swaps."""
    model = model_named(name)
    log = Log(store, model)
    report = Report(model=name)
    started = time.monotonic()
    async with await psycopg.AsyncConnection.connect(
        settings.database_url, autocommit=True
    ) as conn:
        if await _exists(conn, model.tables[0] + OLD):
            raise RebuildError(
                f"an old copy of {name} is still kept: `carelog projections drop-old {name}`"
                f" (or `rollback {name}`) first"
            )
        resuming = await _exists(conn, model.tables[0] + NEXT)
        copy_at = await _max_position(conn, model.positions + NEXT) if resuming else 0
        live_at = await _max_position(conn, model.positions)
        with psycopg.connect(settings.database_url) as sync:
            total = log.count(sync, copy_at)
        report.resumed_from = copy_at
        if dry_run:
            print(
                f"would {'resume' if resuming else 'start'} rebuilding {name} from the event store"
                f" at position {copy_at}: {total} events to read; live is at {live_at};"
                f" tables {', '.join(t + NEXT for t in model.tables)}; then compare and swap",
                file=sys.stderr,
            )
            return report
        if not resuming:
            await _create_copy(conn, model)
        advance = progress(total, 0)
        projection = model.copy(NEXT)
        # Catch up without the lock, to the live position as it moves, until close.
        while True:
            live_at = await _max_position(conn, model.positions)
            copy_at = await _catch_up(
                conn, log, projection, copy_at, live_at, report, advance, duty
            )
            if live_at - copy_at <= BATCH:
                break
        if not confirm(
            f"{name}: the copy has {report.events} events applied; compare and swap it in?"
        ):
            raise RebuildError("not swapped; the copy is kept, run the command again to resume")
        await _level_and_swap(
            settings, conn, log, model, NEXT, report, advance, allow_differences=allow_differences
        )
    report.swapped = True
    report.seconds = time.monotonic() - started
    await _forget_cache(settings, model)
    return report


async def rollback(settings: Settings, store: EventStore, name: str) -> Report:
    """Swaps the kept old tables back in, after applying the events they missed."""
    model = model_named(name)
    report = Report(model=name)
    started = time.monotonic()
    async with await psycopg.AsyncConnection.connect(
        settings.database_url, autocommit=True
    ) as conn:
        if not await _exists(conn, model.tables[0] + OLD):
            raise RebuildError(f"no old copy of {name} is kept: nothing to roll back to")
        if await _exists(conn, model.tables[0] + NEXT):
            raise RebuildError(f"a rebuild of {name} is in progress; finish or drop it first")
        log = Log(store, model)
        projection = model.copy(OLD)
        old_at = await _max_position(conn, model.positions + OLD)
        live_at = await _max_position(conn, model.positions)
        await _catch_up(conn, log, projection, old_at, live_at, report, lambda _: None, 1.0)
        await _level_and_swap(settings, conn, log, model, OLD, report, lambda _: None)
    report.swapped = True
    report.seconds = time.monotonic() - started
    await _forget_cache(settings, model)
    return report


async def drop_old(settings: Settings, name: str, *, rebuilding: bool = False) -> list[str]:
    """Drops the kept old tables (or, with `rebuilding`, an unfinished copy)."""
    model = model_named(name)
    suffix = NEXT if rebuilding else OLD
    dropped = []
    async with await psycopg.AsyncConnection.connect(
        settings.database_url, autocommit=True
    ) as conn:
        for table in (*model.tables, *model.side_tables):
            if await _exists(conn, table + suffix):
                await conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(table + suffix)))
                dropped.append(table + suffix)
        await conn.execute(
            "DELETE FROM projection_tracking WHERE projection = %s", [f"{model.name}{suffix}"]
        )
    return dropped


async def status(settings: Settings, store: EventStore) -> list[dict[str, Any]]:
    """Each model: position, lag (events and seconds), state, dead letters, code version."""
    rows = []
    async with await psycopg.AsyncConnection.connect(
        settings.database_url, autocommit=True
    ) as conn:
        for model in MODELS.values():
            position = await _max_position(conn, model.positions)
            log = Log(store, model)
            with psycopg.connect(settings.database_url) as sync:
                lag = log.count(sync, position)
            behind = 0.0
            if lag:
                batch, _ = await anyio.to_thread.run_sync(log.read, position, None, 1)
                if batch:
                    behind = (datetime.now(UTC) - batch[0][0].occurred_at).total_seconds()
            state = "live"
            if await _exists(conn, model.tables[0] + NEXT):
                state = "rebuilding"
            elif not await _answers(settings, model):
                state = "stopped"
            dlq = model.dead_letter_topic(settings)
            try:
                dead = sum((await end_offsets(settings, dlq)).values())
            except Exception:
                dead = 0
            rows.append(
                {
                    "name": model.name,
                    "position": position,
                    "lagEvents": lag,
                    "lagSeconds": round(behind, 1),
                    "state": state,
                    "deadLettered": dead,
                    "version": model.version,
                    "oldCopyKept": await _exists(conn, model.tables[0] + OLD),
                }
            )
    return rows


async def _answers(settings: Settings, model: Model) -> bool:
    url = f"http://127.0.0.1:{settings.ports[model.port]}/health/ready"
    try:
        async with httpx.AsyncClient(timeout=1.0) as client:
            return (await client.get(url)).status_code == 200
    except httpx.HTTPError:
        return False
