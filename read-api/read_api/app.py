"""The query API (port 4003): patients, paged by cursor, filtered, cached in Redis."""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import date
from typing import Annotated, Any
from uuid import UUID

import msgspec
import structlog
from litestar import Litestar, Request, Response, get
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.params import FromPath, Parameter
from prometheus_client import Counter
from redis.asyncio import Redis

from domain.errors import InvalidData, PatientNotFound
from domain.roles import PATIENT_READERS
from read_api.queries import PatientQuery, build, decode_cursor, page_from_rows
from readmodels.directory import (
    LIVE,
    DirectoryCache,
    Tables,
    get_record,
    reached,
    records,
)
from runtime.db import open_pool
from runtime.http import (
    EXCEPTION_HANDLERS,
    bind_correlation_id,
    echo_correlation_id,
    metrics_middleware,
    operational_routes,
    problem,
)
from runtime.security import TokenVerifier, requires
from runtime.settings import Settings

log = structlog.get_logger(__name__)

CACHE = Counter("carelog_read_cache_total", "Query API cache lookups", ["kind", "outcome"])

_LIST_PARAMS = frozenset(
    {
        "limit",
        "cursor",
        "name",
        "email",
        "dateOfBirthFrom",
        "dateOfBirthTo",
        "registeredFrom",
        "registeredTo",
        "sort",
        "minPosition",
    }
)
_page_encoder = msgspec.json.Encoder()


class NotYetProjected(Exception):
    """The read model has not reached the position the client asked for, in time."""


def _reject_unknown(request: Request[Any, Any, Any], allowed: frozenset[str]) -> None:
    errors = {key: "is not a known query parameter" for key in set(request.query_params) - allowed}
    for key, value in request.query_params.items():
        if key in allowed and "\x00" in value:
            errors[key] = "must not contain NUL characters"
    if errors:
        raise InvalidData(dict(sorted(errors.items())))


async def _await_position(state: State, position: int | None) -> None:
    """Waits (bounded) until the directory has applied the event at `position`."""
    if position is None:
        return
    deadline = time.monotonic() + state.settings.read_wait_seconds
    pause = 0.005
    while True:
        async with state.pool.connection() as conn:
            if await reached(conn, position, state.tables):
                return
        if time.monotonic() + pause > deadline:
            raise NotYetProjected()
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.1)


@get("/patients", summary="List patients", tags=["patients"], guards=[requires(PATIENT_READERS)])
async def list_patients(
    request: Request[Any, Any, Any],
    state: State,
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
        str, Parameter(description="name, registeredDate or dateOfBirth; prefix - to reverse")
    ] = "name",
    minPosition: Annotated[
        int | None,
        Parameter(ge=1, description="Answer only once the read model reflects this position"),
    ] = None,
) -> Response[bytes]:
    _reject_unknown(request, _LIST_PARAMS)
    query = PatientQuery(
        limit=limit,
        sort=sort,
        cursor=decode_cursor(cursor) if cursor else None,
        name=name or None,
        email=email or None,
        date_of_birth_from=dateOfBirthFrom,
        date_of_birth_to=dateOfBirthTo,
        registered_from=registeredFrom,
        registered_to=registeredTo,
    )
    query.check()
    await _await_position(state, minPosition)
    cache: DirectoryCache = state.cache
    use_cache = minPosition is None
    key = hashlib.sha1(repr(query).encode(), usedforsecurity=False).hexdigest()
    generation = 0
    if use_cache:
        generation, cached = await cache.get_page(key)
        if cached is not None:
            CACHE.labels("page", "hit").inc()
            return Response(cached, media_type="application/json")
        CACHE.labels("page", "miss").inc()
    statement, params = build(query, state.tables)
    async with state.pool.connection() as conn, conn.cursor(row_factory=records) as cur:
        await cur.execute(statement, params)
        rows = await cur.fetchall()
    body = _page_encoder.encode(page_from_rows(query, rows))
    if use_cache:
        await cache.put_page(generation, key, body)
    return Response(body, media_type="application/json")


@get(
    "/patients/{patient_id:str}",
    summary="Get one patient",
    tags=["patients"],
    guards=[requires(PATIENT_READERS)],
)
async def get_patient(
    patient_id: FromPath[str],
    request: Request[Any, Any, Any],
    state: State,
    minPosition: Annotated[int | None, Parameter(ge=1)] = None,
) -> Response[bytes]:
    _reject_unknown(request, frozenset({"minPosition"}))
    try:
        pid = UUID(patient_id)
    except ValueError:
        raise PatientNotFound(patient_id) from None
    await _await_position(state, minPosition)
    cache: DirectoryCache = state.cache
    if minPosition is None:
        cached = await cache.get_patient(str(pid))
        if cached is not None:
            CACHE.labels("patient", "hit").inc()
            version, body = cached
            if not body:
                raise PatientNotFound(patient_id)
            return Response(body, media_type="application/json", headers={"ETag": f'"{version}"'})
        CACHE.labels("patient", "miss").inc()
    async with state.pool.connection() as conn:
        record = await get_record(conn, pid, state.tables)
    if record is None:
        raise PatientNotFound(patient_id)
    body = record.cache_entry()
    await cache.put_patient(str(pid), record.version, body)
    if not body:
        raise PatientNotFound(patient_id)
    return Response(body, media_type="application/json", headers={"ETag": f'"{record.version}"'})


def _invalid(_: Request[Any, Any, Any], exc: InvalidData) -> Response[Any]:
    return problem(400, "invalid request", errors=exc.errors)


def _not_found(_: Request[Any, Any, Any], exc: PatientNotFound) -> Response[Any]:
    return problem(404, "no such patient")


def _not_yet(request: Request[Any, Any, Any], exc: NotYetProjected) -> Response[Any]:
    return problem(
        503,
        "the read model has not reached minPosition yet; retry shortly",
        headers={"Retry-After": "1"},
    )


def create_app(
    settings: Settings, tables: Tables = LIVE, verifier: TokenVerifier | None = None
) -> Litestar:
    """The query API; opens its database pool and Redis client at startup.

    Tokens are checked with `verifier`, by default against the auth service's JWKS.
    """

    async def start(app: Litestar) -> None:
        pool = await open_pool(settings.database_url, min_size=2, max_size=16)
        redis = Redis.from_url(settings.redis_url)
        app.state.update(
            settings=settings,
            tables=tables,
            pool=pool,
            redis=redis,
            cache=DirectoryCache(
                redis, prefix=settings.cache_prefix, ttl_seconds=settings.cache_ttl_seconds
            ),
        )

    async def stop(app: Litestar) -> None:
        await app.state.redis.aclose()
        await app.state.pool.close()

    async def database() -> None:
        async with app.state.pool.connection() as conn:
            await conn.execute("SELECT 1")

    async def cache() -> None:
        await app.state.redis.ping()

    app = Litestar(
        before_request=bind_correlation_id,
        before_send=[echo_correlation_id],
        logging_config=None,
        route_handlers=[
            list_patients,
            get_patient,
            *operational_routes({"database": database, "cache": cache}),
        ],
        on_startup=[start],
        on_shutdown=[stop],
        exception_handlers={
            **EXCEPTION_HANDLERS,
            InvalidData: _invalid,
            PatientNotFound: _not_found,
            NotYetProjected: _not_yet,
        },
        middleware=[metrics_middleware("read-api")],
        openapi_config=OpenAPIConfig(
            title="carelog queries",
            version="1.0.0",
            description="Reads: paged, filtered, cached views of the read models.",
            path="/schema",
        ),
    )
    app.state.verifier = verifier or TokenVerifier.from_settings(settings)
    return app
