"""HTTP plumbing shared by every carelog service: errors, health, metrics, serving."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import eventsourcing.persistence
import msgspec
import psycopg
import psycopg_pool
import redis.exceptions
import structlog
import uvicorn
from litestar import Litestar, Request, Response, get
from litestar.exceptions import HTTPException, ValidationException
from litestar.handlers import BaseRouteHandler
from litestar.openapi.spec import (
    OpenAPIFormat,
    OpenAPIMediaType,
    OpenAPIType,
    Operation,
    RequestBody,
    Schema,
)
from litestar.types import ASGIApp, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

log = structlog.get_logger(__name__)

HTTP_REQUESTS = Counter(
    "carelog_http_requests_total",
    "HTTP requests answered",
    ["service", "method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "carelog_http_request_seconds",
    "Time to answer an HTTP request",
    ["service", "method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

CORRELATION_HEADER = "X-Correlation-ID"
_CORRELATION_KEY = "carelog.correlation_id"
_USABLE_ID = re.compile(r"^[\x21-\x7e]{1,100}$")


def correlation_id(scope: Scope) -> str:
    """The request's correlation id: the client's `X-Correlation-ID` if usable, else a new one.

    Decided once per request and kept in its scope, so the handler, the events it
    writes, its log lines and the response header all carry the same id.
    """
    known = scope.get(_CORRELATION_KEY)
    if known is None:
        given = dict(scope.get("headers", ())).get(b"x-correlation-id", b"").decode("latin-1")
        known = given if _USABLE_ID.match(given) else str(uuid.uuid4())
        scope[_CORRELATION_KEY] = known  # type: ignore[literal-required]
    return str(known)


async def bind_correlation_id(request: Request[Any, Any, Any]) -> None:
    """before_request: every log line written for this request names its correlation id."""
    structlog.contextvars.bind_contextvars(correlation_id=correlation_id(request.scope))


async def echo_correlation_id(message: Any, scope: Scope) -> None:
    """before_send: every response, errors and 404s included, echoes the correlation id."""
    if message["type"] == "http.response.start":
        headers = message.setdefault("headers", [])
        if not any(name.lower() == b"x-correlation-id" for name, _ in headers):
            headers.append((b"x-correlation-id", correlation_id(scope).encode()))


Check = Callable[[], Awaitable[None]]
"""A readiness check: returns when its dependency answers, raises otherwise."""


def problem(
    status: int, detail: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> Response[dict[str, Any]]:
    """An error answer: `{"status", "detail", ...}` as application/problem+json."""
    return Response(
        {"status": status, "detail": detail, **extra},
        status_code=status,
        media_type="application/problem+json",
        headers=dict(headers or {}),
    )


def _http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    extra: dict[str, Any] = {}
    detail = exc.detail
    if isinstance(exc, ValidationException):
        detail = "invalid request"  # the default names the URL, which may carry personal data
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list):
        errors = {}
        for item in exc.extra:
            if isinstance(item, dict) and item.get("key"):
                errors[str(item["key"])] = str(item.get("message", "is invalid"))
        if errors:
            extra["errors"] = errors
    return problem(exc.status_code, detail, headers=exc.headers, **extra)


def _unavailable(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.warning("dependency unavailable", path=request.url.path, error=type(exc).__name__)
    return problem(503, "a dependency is unavailable; retry shortly", headers={"Retry-After": "1"})


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unexpected error", method=request.method, path=request.url.path)
    return problem(500, "internal error")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    HTTPException: _http_exception,
    psycopg.OperationalError: _unavailable,
    eventsourcing.persistence.OperationalError: _unavailable,
    eventsourcing.persistence.InterfaceError: _unavailable,
    psycopg_pool.PoolTimeout: _unavailable,
    redis.exceptions.ConnectionError: _unavailable,
    redis.exceptions.TimeoutError: _unavailable,
    Exception: _unexpected,
}


def metrics_middleware(service: str) -> Callable[[ASGIApp], ASGIApp]:
    """Counts and times every request by its route template (never the raw path)."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            start = time.perf_counter()
            status = 500

            async def sending(message: Any) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            try:
                await app(scope, receive, sending)
            finally:
                route = scope.get("path_template") or "unmatched"
                method = scope.get("method", "")
                HTTP_REQUESTS.labels(service, method, route, str(status)).inc()
                HTTP_LATENCY.labels(service, method, route).observe(time.perf_counter() - start)

        return middleware

    return factory


def operational_routes(checks: Mapping[str, Check]) -> list[BaseRouteHandler]:
    """`/health/live`, `/health/ready` (runs every check) and `/metrics`."""

    @get("/health/live", include_in_schema=False, sync_to_thread=False)
    def live() -> dict[str, str]:
        return {"status": "live"}

    @get("/health/ready", include_in_schema=False)
    async def ready() -> Response[dict[str, Any]]:
        results = await run_checks(checks)
        ok = all(v == "ok" for v in results.values())
        return Response(
            {"status": "ready" if ok else "unavailable", "checks": results},
            status_code=200 if ok else 503,
        )

    @get("/metrics", include_in_schema=False, sync_to_thread=False)
    def metrics() -> Response[bytes]:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return [live, ready, metrics]


async def run_checks(checks: Mapping[str, Check], timeout: float = 2.0) -> dict[str, str]:
    async def one(check: Check) -> str:
        try:
            await asyncio.wait_for(check(), timeout)
        except Exception as exc:
            return f"failed: {type(exc).__name__}"
        return "ok"

    names = list(checks)
    outcomes = await asyncio.gather(*(one(checks[n]) for n in names))
    return dict(zip(names, outcomes, strict=True))


def json_body_operation(struct: type[msgspec.Struct]) -> type[Operation]:
    """An OpenAPI operation that documents a JSON body the handler decodes itself.

    Handlers that collect every field's error read the raw body; this keeps the
    body's schema in the published OpenAPI all the same.
    """
    schema = _schema_of(struct)

    class BodyOperation(Operation):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.request_body = RequestBody(
                content={"application/json": OpenAPIMediaType(schema=schema)}, required=True
            )

    return BodyOperation


def _schema_of(struct: type[msgspec.Struct]) -> Schema:
    raw = msgspec.json.schema(struct)
    definition = raw["$defs"][raw["$ref"].split("/")[-1]]

    def convert(node: dict[str, Any]) -> Schema:
        keep = {_SCHEMA_KEYS_RENAMED.get(k, k): v for k, v in node.items() if k in _SCHEMA_KEYS}
        if "type" in keep:
            keep["type"] = OpenAPIType(keep["type"])
        if "format" in keep:
            keep["format"] = OpenAPIFormat(keep["format"])
        if "properties" in node:
            keep["properties"] = {k: convert(v) for k, v in node["properties"].items()}
        return Schema(**keep)

    return convert(definition)


_SCHEMA_KEYS = {
    "type",
    "format",
    "title",
    "description",
    "required",
    "minLength",
    "maxLength",
    "pattern",
    "examples",
}
_SCHEMA_KEYS_RENAMED = {"minLength": "min_length", "maxLength": "max_length"}


def serve(app: Litestar, host: str, port: int) -> None:
    """Runs an ASGI app with uvicorn until SIGTERM or SIGINT."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="on",
        loop="uvloop",
        http="httptools",
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run()


class _QuietServer(uvicorn.Server):
    """Leaves SIGTERM and SIGINT to the worker that embeds it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HealthServer:
    """A worker's health and metrics endpoint, served inside its own event loop."""

    def __init__(self, checks: Mapping[str, Check], host: str, port: int):
        app = Litestar(route_handlers=operational_routes(checks), logging_config=None)
        config = uvicorn.Config(
            app, host=host, port=port, log_config=None, access_log=False, lifespan="off"
        )
        self.server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> HealthServer:
        self._task = asyncio.get_running_loop().create_task(self.server.serve())
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises why it could not start (e.g. port taken)
                raise RuntimeError("health server stopped while starting")
            await asyncio.sleep(0.01)
        return self

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task is not None:
            await self._task


async def serve_health(checks: Mapping[str, Check], host: str, port: int) -> HealthServer:
    """Starts a worker's health and metrics endpoint; `await .stop()` at shutdown."""
    return await HealthServer(checks, host, port).start()
