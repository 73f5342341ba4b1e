"""The query API (port 4003): patients, paged by cursor, filtered, cached in Redis.

PostgreSQL is the one hard dependency: without Redis every read is answered from the
database (see `read_api.cache`), and readiness names the cache `degraded`. Every answer
that shows a patient's personal data, cached or not, is recorded in the disclosure audit
before it goes out (`runtime.audit`); without the record it is a 503.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import anyio
import msgspec
import psycopg_pool
import structlog
from litestar import Litestar, Request, Response, get
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, Parameter
from prometheus_client import Counter
from redis.asyncio import Redis

from domain.errors import InvalidData, PatientErased, PatientNotFound
from domain.roles import PATIENT_READERS
from read_api import analytics, appointments, disclosures, history, notifications, waiting
from read_api.cache import GuardedCache, redis_client
from read_api.queries import build, page_from_rows, patient_query
from read_api.waiting import await_position
from readmodels.directory import (
    ERASED_ENTRY,
    LIVE,
    DirectoryCache,
    Tables,
    get_record,
    records,
)
from runtime import audit, audit_spool
from runtime.crypto import Keyring
from runtime.db import open_pool
from runtime.http import (
    DOCS,
    EMAIL_FORMAT,
    QUERY_RULES,
    Documented,
    Problems,
    Soft,
    answers,
    problem,
    service_app,
)
from runtime.security import TokenVerifier, requires
from runtime.settings import Settings, SettingsError

log = structlog.get_logger(__name__)

CACHE = Counter("carelog_read_cache_total", "Query API cache lookups", ["kind", "outcome"])

_page_encoder = msgspec.json.Encoder()


class _Shown(msgspec.Struct):
    id: UUID


class _ShownPage(msgspec.Struct):
    patients: list[_Shown]


_shown_page = msgspec.json.Decoder(_ShownPage)
"""The ids on a cached page (the disclosure audit records them), read without the rest."""


@dataclass(frozen=True)
class Directory:
    """What the patient queries read: the directory's tables, its cache, how long to wait."""

    pool: psycopg_pool.AsyncConnectionPool[Any]
    cache: GuardedCache
    tables: Tables
    read_wait_seconds: float


async def _await_position(directory: Directory, position: int | None) -> None:
    """Waits (bounded) until the directory has applied the event at `position`."""
    await await_position(
        directory.pool, directory.tables.positions, position, directory.read_wait_seconds
    )


class PatientView(msgspec.Struct, rename="camel", kw_only=True):
    """One patient as the query API shows it: `readmodels.directory.PatientRow`, which the
    answers are encoded from, described with the formats its values have."""

    id: UUID
    name: str
    email: Annotated[str, msgspec.Meta(extra_json_schema=EMAIL_FORMAT)]
    address: str
    date_of_birth: date
    registered_date: date
    version: int


class PatientPage(msgspec.Struct, kw_only=True):
    """One page of patients (`read_api.queries.Page`)."""

    patients: list[PatientView]
    next: Annotated[
        str | None, msgspec.Meta(description="Pass as `cursor` for the next page; null at the end")
    ]


@get(
    "/patients",
    summary="List patients",
    tags=["patients"],
    guards=[requires(PATIENT_READERS)],
    responses=answers(PatientPage, "A page of patients"),
    opt={DOCS: Documented(problems=audit.UNAUDITED), QUERY_RULES: patient_query},
)
async def list_patients(
    request: Request[Any, Any, Any],
    directory: NamedDependency[Directory],
    limit: Annotated[int, Parameter(ge=1, le=200, description="Page size")] = 50,
    cursor: Annotated[
        str | None, Parameter(description="The `next` value of the previous page")
    ] = None,
    name: Annotated[
        str | None, Parameter(max_length=100, description="Contains, case-insensitive")
    ] = None,
    email: Annotated[str | None, Parameter(max_length=254, description="Exact, any case")] = None,
    dateOfBirthFrom: Annotated[date | None, Parameter()] = None,
    dateOfBirthTo: Annotated[date | None, Parameter()] = None,
    registeredFrom: Annotated[date | None, Parameter()] = None,
    registeredTo: Annotated[date | None, Parameter()] = None,
    sort: Annotated[
        Literal[
            "name", "-name", "registeredDate", "-registeredDate", "dateOfBirth", "-dateOfBirth"
        ],
        Parameter(description="name, registeredDate or dateOfBirth; prefix - to reverse"),
    ] = "name",
    minPosition: Annotated[
        int | None,
        Parameter(ge=1, description="Answer only once the read model reflects this position"),
    ] = None,
) -> Response[bytes]:
    query = patient_query(
        {
            "limit": limit,
            "sort": sort,
            "cursor": cursor,
            "name": name,
            "email": email,
            "dateOfBirthFrom": dateOfBirthFrom,
            "dateOfBirthTo": dateOfBirthTo,
            "registeredFrom": registeredFrom,
            "registeredTo": registeredTo,
        }
    )
    await _await_position(directory, minPosition)
    cache = directory.cache
    use_cache = minPosition is None
    key = hashlib.sha1(repr(query).encode(), usedforsecurity=False).hexdigest()
    generation: int | None = None
    if use_cache:
        generation, cached = await cache.get_page(key)
        if cached is not None:
            CACHE.labels("page", "hit").inc()
            shown = [p.id for p in _shown_page.decode(cached).patients]
            if shown:
                await audit.disclosed(request, "patient.list", shown)
            return Response(cached, media_type="application/json")
        CACHE.labels("page", "miss").inc()
    statement, params = build(query, directory.tables)
    async with directory.pool.connection() as conn, conn.cursor(row_factory=records) as cur:
        await cur.execute(statement, params)
        rows = await cur.fetchall()
    page = page_from_rows(query, rows)
    body = _page_encoder.encode(page)
    if generation is not None:
        await cache.put_page(generation, key, body)
    if page.patients:
        await audit.disclosed(request, "patient.list", [p.id for p in page.patients])
    return Response(body, media_type="application/json")


@get(
    "/patients/{patient_id:str}",
    summary="Get one patient",
    tags=["patients"],
    guards=[requires(PATIENT_READERS)],
    responses=answers(PatientView, "The patient"),
    opt={
        DOCS: Documented(
            problems={
                404: "No such patient (or the id is not a UUID)",
                410: "The patient was erased",
                **audit.UNAUDITED,
            },
            etag=True,
        )
    },
)
async def get_patient(
    request: Request[Any, Any, Any],
    patient_id: FromPath[str],
    directory: NamedDependency[Directory],
    minPosition: Annotated[int | None, Parameter(ge=1)] = None,
) -> Response[bytes]:
    try:
        pid = UUID(patient_id)
    except ValueError:
        raise PatientNotFound(patient_id) from None
    await _await_position(directory, minPosition)
    cache = directory.cache
    if minPosition is None:
        cached = await cache.get_patient(str(pid))
        if cached is not None:
            CACHE.labels("patient", "hit").inc()
            version, body = cached
            if body == ERASED_ENTRY:
                raise PatientErased(patient_id)
            if not body:
                raise PatientNotFound(patient_id)
            await audit.disclosed(request, "patient.get", [pid])
            return Response(body, media_type="application/json", headers={"ETag": f'"{version}"'})
        CACHE.labels("patient", "miss").inc()
    async with directory.pool.connection() as conn:
        record = await get_record(conn, pid, directory.tables)
    if record is None:
        raise PatientNotFound(patient_id)
    body = record.cache_entry()
    await cache.put_patient(str(pid), record.version, body)
    if body == ERASED_ENTRY:
        raise PatientErased(patient_id)
    if not body:
        raise PatientNotFound(patient_id)
    await audit.disclosed(request, "patient.get", [pid])
    return Response(body, media_type="application/json", headers={"ETag": f'"{record.version}"'})


PROBLEMS: Problems = {
    InvalidData: lambda exc: problem(400, "invalid request", errors=exc.errors),
    PatientNotFound: lambda exc: problem(404, "no such patient"),
    PatientErased: lambda exc: problem(410, "the patient was erased"),
}


def spooled_writer(
    pool: psycopg_pool.AsyncConnectionPool[Any], settings: Settings
) -> audit_spool.SpooledWriter:
    """The production audit writer: records spooled in `settings.audit_spool_dir`."""
    return audit_spool.SpooledWriter(pool, Path(settings.audit_spool_dir), settings.database_url)


def create_app(
    settings: Settings,
    tables: Tables = LIVE,
    verifier: TokenVerifier | None = None,
    audit_writer: Callable[[psycopg_pool.AsyncConnectionPool[Any], Settings], audit.Writer] = (
        spooled_writer
    ),
) -> Litestar:
    """The query API; opens its database pool and Redis client at startup.

    Tokens are checked with `verifier`, by default against the auth service's JWKS.
    Disclosures are recorded by `audit_writer(pool, settings)`; only the benchmark passes
    another.
    """
    opened: list[tuple[Directory, Redis, appointments.Appointments, analytics.Analytics]] = []
    writers: list[audit.Writer] = []
    try:
        ZoneInfo(settings.practice_timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise SettingsError(
            f"CARELOG_PRACTICE_TIMEZONE={settings.practice_timezone!r} is not an IANA time zone"
        ) from None

    async def start(app: Litestar) -> None:
        pool = await open_pool(settings.database_url, min_size=2, max_size=16, autocommit=True)
        redis = redis_client(settings)
        cache = GuardedCache(
            DirectoryCache(
                redis, prefix=settings.cache_prefix, ttl_seconds=settings.cache_ttl_seconds
            ),
            failures=settings.cache_breaker_failures,
            reset_seconds=settings.cache_breaker_reset_seconds,
        )
        writer = audit_writer(pool, settings)
        await writer.start()
        audit.open_writer(app.state, writer)
        writers.append(writer)
        keyring = Keyring.from_settings(settings)
        keyring.listen()  # an erasure elsewhere drops the key here too
        opened.append(
            (
                Directory(pool, cache, tables, settings.read_wait_seconds),
                redis,
                appointments.Appointments(pool, settings.read_wait_seconds, keyring=keyring),
                analytics.Analytics(pool, settings.read_wait_seconds, settings.practice_timezone),
            )
        )

    async def stop(app: Litestar) -> None:
        for writer in writers:
            await writer.close()
        for directory, redis, schedule, _ in opened:
            await redis.aclose()
            await directory.pool.close()
            if schedule.keyring is not None:
                await anyio.to_thread.run_sync(schedule.keyring.close)

    def directory() -> Directory:
        return opened[0][0]

    def schedule() -> appointments.Appointments:
        return opened[0][2]

    def counts() -> analytics.Analytics:
        return opened[0][3]

    def database_pool() -> Any:
        return opened[0][0].pool

    async def database() -> None:
        async with opened[0][0].pool.connection() as conn:
            await conn.execute("SELECT 1")

    return service_app(
        "read-api",
        [
            list_patients,
            get_patient,
            *appointments.ROUTES,
            *analytics.ROUTES,
            *notifications.ROUTES,
            *history.ROUTES,
            *disclosures.ROUTES,
        ],
        title="queries",
        description="Reads: paged, filtered, cached views of the read models.",
        problems={**PROBLEMS, **waiting.PROBLEMS, **appointments.PROBLEMS, **audit.PROBLEMS},
        checks={"database": database, "cache": Soft(lambda: opened[0][0].cache.check())},
        dependencies={
            "directory": Provide(directory, sync_to_thread=False),
            "source": Provide(schedule, sync_to_thread=False),
            "analytics": Provide(counts, sync_to_thread=False),
            "pool": Provide(database_pool, sync_to_thread=False),
        },
        on_startup=[start],
        on_shutdown=[stop],
        state={"verifier": verifier or TokenVerifier.from_settings(settings)},
    )
