"""The HTTP app factory every carelog service uses, and its shared pieces.

`service_app` builds a Litestar app with what every service answers the same way:
- errors as `application/problem+json` `{"status", "detail", "errors"?}`, through
  Litestar's problem-details plugin; each service adds its own exception → problem map;
- every bad query parameter named at once (unknown ones too), checked against the
  handler's own signature, so a parameter's rules live only there;
- a body that fails its typed decoding re-checked by the route's `body_errors`
  option (see `BODY_ERRORS`), so every bad field is named at once;
- the correlation id, decided once per request, bound to its log lines, echoed on
  every answer and read by handlers with `correlation_id(request.scope)`;
- Prometheus metrics per route template (Litestar's Prometheus integration) at
  `/metrics`, and `/health/live` and `/health/ready`;
- Swagger UI at `/schema/swagger` (and `/schema`), its scripts served by the service
  itself (runtime/apidocs.py: no CDN);
- an OpenAPI document at `/schema/openapi.json` that says what the wire does: Litestar
  derives bodies and parameters from the handlers' signatures, and `complete_document`
  adds, from the same guards, options and limits the requests meet, each operation's
  roles and bearer security, every problem it can answer (one `Problem` schema, as
  `application/problem+json`) and the headers it reads and writes.

`serve` runs a service's app with Granian, in one or more worker processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import gc
import re
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import eventsourcing.persistence
import msgspec
import psycopg
import psycopg_pool
import redis.exceptions
import structlog
import uvicorn
from litestar import Litestar, Request, Response, get
from litestar.constants import RESERVED_KWARGS
from litestar.datastructures import State
from litestar.di import Provide
from litestar.enums import ScopeType
from litestar.exceptions import ClientException, HTTPException, ValidationException
from litestar.handlers import BaseRouteHandler, HTTPRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Tag
from litestar.params import ParameterKwarg
from litestar.plugins.problem_details import (
    ProblemDetailsConfig,
    ProblemDetailsException,
    ProblemDetailsPlugin,
)
from litestar.plugins.prometheus import (
    PrometheusConfig,
    PrometheusController,
    PrometheusMiddleware,
)
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from litestar.utils.scope.state import ScopeState
from opentelemetry.trace import SpanKind

from domain.errors import InvalidData
from runtime import apidocs, tracing

log = structlog.get_logger(__name__)

CORRELATION_HEADER = "X-Correlation-ID"
_CORRELATION_KEY = "carelog.correlation_id"
_USABLE_ID = re.compile(r"^[\x21-\x7e]{1,100}$")

BODY_ERRORS = "body_errors"
"""A route option: `opt={BODY_ERRORS: fn}`, fn(raw body) -> {field: message} for every
bad field. Called when the typed body fails to decode (which stops at the first error)."""


def every_error(
    struct: type[msgspec.Struct], parse: Callable[[dict[str, Any]], object]
) -> Callable[[bytes], dict[str, str]]:
    """A route's BODY_ERRORS check: every bad field of a body that failed typed decoding.

    Fields the struct does not declare are named as unknown; `parse` (the domain's
    parser over the raw JSON object) names the rest by raising InvalidData.
    """
    known = frozenset(struct.__struct_encode_fields__)

    def check(raw: bytes) -> dict[str, str]:
        if not raw.strip():
            return {"body": "a JSON object is required"}
        try:
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            return {"body": f"malformed JSON: {exc}"}
        if not isinstance(body, dict):
            return {"body": "must be a JSON object"}
        errors = {key: "is not a known field" for key in sorted(set(body) - known)}
        try:
            parse(body)
        except InvalidData as invalid:
            errors = {**invalid.errors, **errors}
        return errors

    return check


LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]


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


async def echo_correlation_id(message: Any, scope: Scope) -> None:
    """before_send: every response, errors and 404s included, echoes the correlation id."""
    if message["type"] == "http.response.start":
        headers = message.setdefault("headers", [])
        if not any(name.lower() == b"x-correlation-id" for name, _ in headers):
            headers.append((b"x-correlation-id", correlation_id(scope).encode()))


_QUERY_FIELDS: weakref.WeakKeyDictionary[Any, dict[str, tuple[Any, bool]]] = (
    weakref.WeakKeyDictionary()
)
"""Per route handler (not by id(): a collected handler's id can be reused by another)."""


def _query_fields(request: Request[Any, Any, Any]) -> dict[str, tuple[Any, bool]]:
    """The handler's query parameters: wire name → (declared type, required)."""
    handler = request.route_handler
    try:
        known = _QUERY_FIELDS.get(handler)
    except TypeError:  # a handler Litestar makes itself (OPTIONS) takes no weak reference
        return _declared_query_fields(request)
    if known is None:
        known = _QUERY_FIELDS[handler] = _declared_query_fields(request)
    return known


def _declared_query_fields(request: Request[Any, Any, Any]) -> dict[str, tuple[Any, bool]]:
    model = request.route_handler.signature_model
    skip = RESERVED_KWARGS | model._dependency_name_set | set(request.path_params)
    fields: dict[str, tuple[Any, bool]] = {}
    for name, definition in model._fields.items():
        if name in skip:
            continue
        kwarg = definition.kwarg_definition
        if isinstance(kwarg, ParameterKwarg) and (kwarg.header or kwarg.cookie):
            continue
        wire = kwarg.query if isinstance(kwarg, ParameterKwarg) and kwarg.query else name
        fields[wire] = (model.__annotations__[name], not definition.has_default)
    return fields


def _message(exc: Exception) -> str:
    text = str(exc).split(" - at `", 1)[0]
    return text[0].lower() + text[1:] if text else "is invalid"


QUERY_RULES = "query_rules"
"""A route option: `opt={QUERY_RULES: fn}`, fn(typed query values) raising InvalidData for
the rules beyond each parameter's type (a cursor this API gave out, `to` after `from`).
The handler applies the same fn; when some parameter does not even fit its type, it runs
over the others here, so one answer names every bad parameter."""


def query_errors(request: Request[Any, Any, Any]) -> dict[str, str]:
    """Every query parameter that is missing, unknown, does not fit its type, or breaks
    one of the route's `QUERY_RULES`, at once."""
    fields = _query_fields(request)
    typed: dict[str, Any] = {}
    errors = {
        wire: "is required"
        for wire, (_, required) in fields.items()
        if required and wire not in request.query_params
    }
    for key in request.query_params:
        if key not in fields:
            errors[key] = "is not a known query parameter"
            continue
        value = request.query_params.get(key) or ""
        if "\x00" in value:
            errors[key] = "must not contain NUL characters"
            continue
        try:
            typed[key] = msgspec.convert(value, type=fields[key][0], strict=False)
        except (msgspec.ValidationError, TypeError, ValueError) as exc:
            errors[key] = _message(exc)
    rules = request.route_handler.opt.get(QUERY_RULES) if errors else None
    if rules is not None:
        try:
            rules(typed)
        except InvalidData as invalid:
            errors = {**invalid.errors, **errors}
    return dict(sorted(errors.items()))


MAX_HEADER_BYTES = 16 * 1024
"""Request headers larger than this, together, are refused (431)."""

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def _json_media(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def _before_request(request: Request[Any, Any, Any]) -> None:
    structlog.contextvars.bind_contextvars(correlation_id=correlation_id(request.scope))
    if sum(len(k) + len(v) for k, v in request.scope.get("headers", ())) > MAX_HEADER_BYTES:
        raise problem(431, f"request headers are larger than {MAX_HEADER_BYTES} bytes")
    if request.method in _BODY_METHODS:
        # A body that says what it is must say JSON; one that does not is read as JSON.
        content_type = request.headers.get("content-type")
        if content_type is not None and not _json_media(content_type):
            raise problem(
                415,
                "the body must be JSON",
                headers={"Accept": "application/json"},
                errors={"Content-Type": "must be application/json"},
            )
    if errors := query_errors(request):
        raise problem(400, "invalid request", errors=errors)


def problem(
    status: int, detail: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> ProblemDetailsException:
    """An error answer: `{"status", "detail", ...extra}` as application/problem+json."""
    return ProblemDetailsException(
        status_code=status, detail=detail, headers=dict(headers or {}), extra=extra or None
    )


Problems = Mapping[type[BaseException], Callable[[Any], ProblemDetailsException]]
"""Exception type → the problem it answers with."""


def _from_http_exception(exc: HTTPException) -> ProblemDetailsException:
    extra: dict[str, Any] = {}
    detail = exc.detail
    if isinstance(exc, ValidationException):
        detail = "invalid request"  # the default names the URL, which may carry personal data
        if isinstance(exc.extra, list):
            errors = {
                str(item["key"]): _message(Exception(item.get("message") or "is invalid"))
                for item in exc.extra
                if isinstance(item, dict) and item.get("key")
            }
            if errors:
                extra["errors"] = errors
    return problem(exc.status_code, detail, headers=exc.headers, **extra)


def _invalid_request(request: Request[Any, Any, Any], exc: ClientException) -> Response[Any]:
    """A 400 from Litestar's own decoding; a body is re-checked so every field is named."""
    handler = request.scope.get("route_handler")  # none when no route matched (404, 405)
    check = handler.opt.get(BODY_ERRORS) if handler is not None else None
    if exc.status_code == 400 and check is not None:
        body = ScopeState.from_scope(request.scope).body  # read (and kept) by the decoding
        if isinstance(body, bytes):
            try:
                errors = check(body)
            except RecursionError:
                errors = {"body": "is nested too deeply"}
            except UnicodeDecodeError:
                errors = {"body": "is not valid UTF-8"}
            if errors:
                return problem(400, "invalid request", errors=errors).to_response(request)
    return _from_http_exception(exc).to_response(request)


def _unstorable(exc: Exception) -> ProblemDetailsException:
    # PostgreSQL refused a value a client sent (a NUL in text, say): the client's error.
    return problem(400, "invalid request: a value cannot be stored (control characters?)")


def _not_utf8(exc: Exception) -> ProblemDetailsException:
    return problem(400, "invalid request", errors={"body": "is not valid UTF-8"})


def _too_deep(exc: Exception) -> ProblemDetailsException:
    return problem(400, "invalid request", errors={"body": "is nested too deeply"})


def _unavailable(exc: Exception) -> ProblemDetailsException:
    log.warning("dependency unavailable", error=type(exc).__name__)
    return problem(503, "a dependency is unavailable; retry shortly", headers={"Retry-After": "1"})


def _unexpected(exc: Exception) -> ProblemDetailsException:
    log.error("unexpected error", exc_info=exc)
    return problem(500, "internal error")


BASE_PROBLEMS: Problems = {
    HTTPException: _from_http_exception,
    psycopg.OperationalError: _unavailable,
    psycopg.DataError: _unstorable,
    RecursionError: _too_deep,
    UnicodeDecodeError: _not_utf8,
    eventsourcing.persistence.OperationalError: _unavailable,
    eventsourcing.persistence.InterfaceError: _unavailable,
    psycopg_pool.PoolTimeout: _unavailable,
    redis.exceptions.ConnectionError: _unavailable,
    redis.exceptions.TimeoutError: _unavailable,
    Exception: _unexpected,
}


DOCS = "docs"
"""A route option: `opt={DOCS: Documented(...)}`, what a route answers that its signature
does not say (its own problems and the headers it reads and writes)."""


@dataclass(frozen=True)
class Documented:
    """What one route adds to the common answers `complete_document` gives every operation."""

    problems: Mapping[int, str] = field(default_factory=dict)
    """Problem statuses of this route (404, 409, 412...) and when each is answered."""
    if_match: bool = False
    """Reads an optional `If-Match` (an ETag it answered); a stale one is 412."""
    etag: bool = False
    """Answers the representation's version as `ETag`."""
    position: bool = False
    """Answers the event store position of its write as `Event-Position`."""
    location: bool = False
    """Answers the new resource's path as `Location`."""
    idempotency_key: str | None = None
    """Reads an optional `Idempotency-Key` matching this pattern: a retry with the same key
    and body answers what the first did; with another body, 422."""


EMAIL_FORMAT: dict[str, Any] = {"extra": {"format": "email"}}
"""`msgspec.Meta(extra_json_schema=EMAIL_FORMAT)` documents a string field as an email
address (the OpenAPI schema generator reads `extra` as schema keywords)."""


def answers(body: type[msgspec.Struct], description: str) -> dict[int, ResponseSpec]:
    """`responses=` of a handler that answers JSON it encoded itself (bytes): its 200 is
    described by `body`, the struct whose fields the bytes carry."""
    return {
        200: ResponseSpec(data_container=body, description=description, generate_examples=False)
    }


PROBLEM = "Problem"
PROBLEM_MEDIA = "application/problem+json"
PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Every error answer, as application/problem+json.",
    "required": ["status", "detail"],
    "properties": {
        "status": {"type": "integer", "minimum": 400, "maximum": 599},
        "detail": {"type": "string"},
        "errors": {
            "type": "object",
            "description": "Each bad field (or header, or query parameter) and what is wrong",
            "additionalProperties": {"type": "string"},
        },
    },
    "additionalProperties": True,
}
_HEADERS: dict[str, dict[str, Any]] = {
    "ETag": {"description": 'The version, quoted: send it back as If-Match ("3")'},
    "Event-Position": {
        "description": "The write's position in the event store: pass it as minPosition to"
        " read your write",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    "Location": {"description": "The path of the created resource"},
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    },
    "WWW-Authenticate": {"description": "The bearer challenge"},
}
_COMMON: dict[int, str] = {
    400: "A query parameter, header or body field is invalid; `errors` names each",
    503: "A dependency is unavailable; retry after Retry-After seconds",
}
_WITH_BODY: dict[int, str] = {
    413: "The body is larger than the service accepts",
    415: "The body is not JSON",
}
_GUARDED: dict[int, str] = {
    401: "No valid bearer token (missing, malformed, expired, revoked)",
    403: "The token's role may not do this",
}


_ALWAYS = frozenset({"ETag", "Location", "Retry-After"})
"""Headers answered whenever the answer they are documented on is (Event-Position is
not when the write was not recorded in the event store's order yet)."""


def _header(name: str) -> dict[str, Any]:
    return {"schema": {"type": "string"}, **_HEADERS[name], "required": name in _ALWAYS}


def _problem(description: str, *headers: str) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "description": description,
        "content": {PROBLEM_MEDIA: {"schema": {"$ref": f"#/components/schemas/{PROBLEM}"}}},
    }
    if headers:
        answer["headers"] = {name: _header(name) for name in headers}
    return answer


def route_roles(handler: HTTPRouteHandler) -> frozenset[Any] | None:
    """The roles a handler's guards admit (`runtime.security.requires`); None if unguarded."""
    roles = None
    for guard in handler.resolve_guards():
        roles = getattr(guard, "roles", roles)
    return roles


def operations(app: Litestar) -> Iterator[tuple[str, str, HTTPRouteHandler]]:
    """(method, OpenAPI path, handler) of every HTTP operation the app serves."""
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            if isinstance(handler, HTTPRouteHandler):
                for method in sorted(handler.http_methods - {"OPTIONS", "HEAD"}):
                    yield method, route.path_format, handler


def complete_document(app: Litestar, document: Mapping[str, Any]) -> dict[str, Any]:
    """The app's OpenAPI document with what Litestar does not derive from the handlers.

    Every operation gets the problems every request can meet (400, 503; 413 and 415 with
    a body), the route's own (`Documented.problems`), and, when guarded, bearer security,
    its roles (`x-required-roles`, from the guard itself) and 401/403; success answers
    name the headers the route writes. Errors are one `Problem` schema.
    """
    done = copy.deepcopy(dict(document))
    handlers = {(m.lower(), path): h for m, path, h in operations(app)}
    for path, item in done.get("paths", {}).items():
        for method, operation in item.items():
            handler = handlers.get((method, path))
            if handler is None or not isinstance(operation, dict):
                continue
            _complete_operation(operation, handler, method)
    components = done.setdefault("components", {})
    components.setdefault("schemas", {})[PROBLEM] = PROBLEM_SCHEMA
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT (ES256)",
        "description": "An access token from POST /auth/login",
    }
    return done


def _complete_operation(operation: dict[str, Any], handler: HTTPRouteHandler, method: str) -> None:
    documented = handler.opt.get(DOCS) or Documented()
    responses: dict[str, Any] = operation.setdefault("responses", {})
    for parameter in operation.get("parameters", []):
        # Every id in a path is a UUID: the handler answers 404 for one that is not.
        schema = parameter.get("schema", {})
        if parameter.get("in") == "path" and parameter["name"].endswith("_id"):
            schema.setdefault("format", "uuid")
    for status, answer in list(responses.items()):
        if status == "204":
            answer.pop("content", None)  # no body, so no media type either
        if status.startswith("2"):
            headers = answer.setdefault("headers", {})
            for name, wanted in (
                ("ETag", documented.etag),
                ("Event-Position", documented.position),
                ("Location", documented.location and status == "201"),
            ):
                if wanted:
                    headers[name] = _header(name)
            if not headers:
                del answer["headers"]
        else:
            del responses[status]  # Litestar's own 400 is not the problem we answer
    problems = dict(_COMMON)
    if method.upper() in _BODY_METHODS:
        problems.update(_WITH_BODY)
    roles = route_roles(handler)
    if roles is not None:
        problems.update(_GUARDED)
        names = sorted(str(getattr(r, "value", r)) for r in roles)
        operation["security"] = [{"bearer": []}]
        operation["x-required-roles"] = names
        needs = f"Requires a bearer token of one of the roles: {', '.join(names)}."
        operation["description"] = f"{operation.get('description', '')}\n\n{needs}".strip()
    problems.update(documented.problems)
    for code, description in sorted(problems.items()):
        headers = ["Retry-After"] if code in (429, 503) else []
        if code == 401:
            headers.append("WWW-Authenticate")
        responses[str(code)] = _problem(description, *headers)
    if documented.idempotency_key is not None:
        responses.setdefault("422", _problem("The Idempotency-Key came before with another body"))
        operation.setdefault("parameters", []).append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "A key of your choosing (a UUID) that makes a retry safe: the"
                " same key and body within 24 hours answer what the first request did, without"
                " a second resource; the same key with another body is 422",
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 255,
                    "pattern": documented.idempotency_key,
                },
            }
        )
    if documented.if_match:
        operation.setdefault("parameters", []).append(
            {
                "name": "If-Match",
                "in": "header",
                "required": False,
                "description": "The ETag you read: a write on a changed version is refused (412)",
                "schema": {"type": "string", "pattern": '^(W/)?"?[0-9]{1,18}"?$|^\\*$'},
            }
        )


def _openapi_plugin(app: Litestar) -> Any:
    return app.plugins.get("OpenAPIPlugin")  # Litestar's own, which serves the document


def openapi_document(app: Litestar) -> dict[str, Any]:
    """The app's OpenAPI document as it serves it (a copy)."""
    document: dict[str, Any] = _openapi_plugin(app).provide_openapi_schema()
    return copy.deepcopy(document)


def _serve_complete_document(app: Litestar) -> None:
    """Makes the app serve `complete_document` of what Litestar derives (built now, once:
    a few milliseconds, and a document that cannot be built fails the app's creation)."""
    plugin = _openapi_plugin(app)
    plugin._openapi_schema = complete_document(app, plugin.provide_openapi().to_schema())


Check = Callable[[], Awaitable[None]]
"""A readiness check: returns when its dependency answers, raises otherwise."""


@dataclass(frozen=True)
class Soft:
    """A readiness check of a dependency the service answers without (a cache): when it
    fails, readiness names it `degraded` and the service stays ready (200)."""

    check: Check


def service_app(
    name: str,
    route_handlers: Sequence[Any],
    *,
    title: str,
    description: str,
    tags: Sequence[str] = (),
    problems: Problems | None = None,
    checks: Mapping[str, Check | Soft] | None = None,
    dependencies: Mapping[str, Provide] | None = None,
    on_startup: Sequence[Callable[[Litestar], Awaitable[None]]] = (),
    on_shutdown: Sequence[Callable[[Litestar], Awaitable[None]]] = (),
    max_body_bytes: int = 64 * 1024,
    state: Mapping[str, Any] | None = None,
) -> Litestar:
    """A carelog HTTP service: its routes plus errors, metrics, health and correlation ids."""
    metrics = PrometheusConfig(
        middleware_class=_RouteMetrics,
        app_name=name,
        prefix="carelog_http",
        group_path=True,
        buckets=list(LATENCY_BUCKETS),
        exclude=["/health", "/metrics"],
    )
    app = Litestar(
        route_handlers=[
            *route_handlers,
            *health_routes(checks or {}),
            MetricsController,
        ],
        plugins=[
            ProblemDetailsPlugin(
                ProblemDetailsConfig(
                    exception_to_problem_detail_map={**BASE_PROBLEMS, **(problems or {})}
                )
            )
        ],
        exception_handlers={
            ValidationException: _invalid_request,
            ClientException: _invalid_request,
        },
        # Handlers read the correlation id with `correlation_id(request.scope)`: a second
        # dependency beside a service would make Litestar resolve the two in a task group,
        # which cost about a sixth of a write's CPU.
        dependencies=dict(dependencies or {}),
        before_request=_before_request,
        before_send=[echo_correlation_id],
        # Traced only when this process exports spans: otherwise not even a no-op span.
        middleware=[metrics.middleware, *([traced] if tracing.enabled() else [])],
        on_startup=list(on_startup),
        on_shutdown=list(on_shutdown),
        request_max_body_size=max_body_bytes,
        openapi_config=OpenAPIConfig(
            title=f"carelog {title}",
            version="1.0.0",
            description=description,
            tags=[Tag(name=t) for t in tags] or None,
            path="/schema",
            render_plugins=apidocs.render_plugins(),
        ),
        logging_config=None,
        state=State(dict(state or {})),
    )
    _serve_complete_document(app)
    return app


def traced(app: Any) -> Any:
    """ASGI middleware: a server span per request, continuing the caller's `traceparent`,
    named by method and route template (never the path itself, which may hold ids the
    route does not name) and carrying the correlation id."""

    async def middleware(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        route = scope.get("path_template", "")
        with tracing.tracer().start_as_current_span(
            f"{method} {route}".rstrip(),
            context=tracing.extract((k.decode("latin-1"), v) for k, v in scope.get("headers", ())),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "http.route": route,
                tracing.CORRELATION_ID: correlation_id(scope),
            },
            **tracing.QUIET,
        ) as span:

            async def sending(message: Any) -> None:
                if message["type"] == "http.response.start":
                    span.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 500:
                        span.set_status(tracing.Status(tracing.StatusCode.ERROR))
                await send(message)

            try:
                await app(scope, receive, sending)
            except BaseException as exc:
                tracing.mark_failed(span, exc)
                raise

    return middleware


class MetricsController(PrometheusController):
    """`/metrics` for Prometheus; not part of a service's published API."""

    include_in_schema = False


class _RouteMetrics(PrometheusMiddleware):
    """Litestar's Prometheus middleware: the same four metrics with the same labels
    (method, path template, status code, app name), made lean. It builds no Request (and
    no URL) per request, reads its labels from the scope, and looks each label set's
    metric children up once. Litestar's own took a fifth of a small write's time in the
    event loop, most of it building and labelling."""

    def __init__(self, app: ASGIApp, config: PrometheusConfig) -> None:
        super().__init__(app, config)
        if config.labels or config.exemplars or not config.group_path:
            raise ValueError("_RouteMetrics labels by route template only")
        self._started: dict[tuple[str, str], Any] = {}
        self._ended: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}

    def _labels(self, method: str, path: str, status: int) -> dict[str, str | int | float]:
        return {
            "method": method,
            "path": path,
            "status_code": status,
            "app_name": self._config.app_name,
        }

    def _in_progress(self, method: str, path: str) -> Any:
        child = self._started.get((method, path))
        if child is None:
            labels = self._labels(method, path, 200)
            child = self.requests_in_progress(labels).labels(*labels.values())
            self._started[(method, path)] = child
        return child

    def _outcome(self, method: str, path: str, status: int) -> tuple[Any, Any, Any]:
        children = self._ended.get((method, path, status))
        if children is None:
            labels = self._labels(method, path, status)
            values = [*labels.values()]
            children = (
                self.request_count(labels).labels(*values),
                self.request_time(labels).labels(*values),
                self.requests_error_count(labels).labels(*values)
                if status >= HTTP_500_INTERNAL_SERVER_ERROR
                else None,
            )
            self._ended[(method, path, status)] = children
        return children

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind: str = scope["type"]
        method = str(scope.get("method", kind)) if kind == ScopeType.HTTP else kind
        if self._config.excluded_http_methods and method in self._config.excluded_http_methods:
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path_template", scope["path"])
        started = time.perf_counter()
        span = [200, 0.0]  # status, duration

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                span[0] = message["status"]
            elif message["type"] == "http.response.body":
                span[1] = time.perf_counter() - started
            await send(message)

        in_progress = self._in_progress(method, path)
        in_progress.inc()
        try:
            await self.app(scope, receive, timed_send)
        finally:
            in_progress.dec()
            count, duration, errors = self._outcome(method, path, int(span[0]))
            if errors is not None:
                errors.inc()
            count.inc()
            duration.observe(span[1])


def database_check(pool: Any) -> Check:
    """A readiness check: the pool hands out a connection that answers."""

    async def database() -> None:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")

    return database


def broker_check(broker: Any) -> Check:
    """A readiness check: the Kafka broker answers a ping."""

    async def kafka() -> None:
        if not await broker.ping(timeout=2.0):
            raise ConnectionError("broker does not answer")

    return kafka


def health_routes(checks: Mapping[str, Check | Soft]) -> list[BaseRouteHandler]:
    """`/health/live` and `/health/ready` (runs every check; ready unless a hard one fails,
    `degraded` but still 200 when only a `Soft` one does)."""

    @get("/health/live", include_in_schema=False, sync_to_thread=False)
    def live() -> dict[str, str]:
        return {"status": "live"}

    @get("/health/ready", include_in_schema=False)
    async def ready() -> Response[dict[str, Any]]:
        results = await run_checks(checks)
        ok = not any(v.startswith("failed") for v in results.values())
        status = "degraded" if any(v != "ok" for v in results.values()) else "ready"
        return Response(
            {"status": status if ok else "unavailable", "checks": results},
            status_code=200 if ok else 503,
        )

    return [live, ready]


async def run_checks(checks: Mapping[str, Check | Soft], timeout: float = 2.0) -> dict[str, str]:
    """Each check's outcome: `ok`, `failed: <why>`, or `degraded: <why>` for a Soft one."""

    async def one(check: Check | Soft) -> str:
        try:
            await asyncio.wait_for((check.check if isinstance(check, Soft) else check)(), timeout)
        except Exception as exc:
            return f"{'degraded' if isinstance(check, Soft) else 'failed'}: {type(exc).__name__}"
        return "ok"

    names = list(checks)
    outcomes = await asyncio.gather(*(one(checks[n]) for n in names))
    return dict(zip(names, outcomes, strict=True))


def settle_heap() -> None:
    """Takes what this process has built so far out of the cycle collector's way.

    A service's modules, app, routes, schemas and pools live as long as the process,
    yet CPython's full collections walk all of them each time: in the query API about
    80 ms a time, twice a second under load, with every request in flight stalled
    behind it (its p99). Called once a long-running process has started: garbage is
    collected, then the survivors move to the permanent generation (`gc.freeze`), so
    full collections walk only what came since. Only for the process that serves; a
    test process would keep its fixtures' cycles for ever.
    """
    gc.collect()
    gc.freeze()


async def _settled(app: Litestar) -> None:
    settle_heap()


def served(app: Litestar) -> Litestar:
    """`app` as a served worker process runs it: its heap settled once it has started
    (`settle_heap`). Each `serve` factory returns its app through this."""
    app.on_startup.append(_settled)
    return app


def serve(factory: str, host: str, port: int, workers: int = 1) -> None:
    """Serves the app `factory` makes, with Granian, until SIGTERM or SIGINT.

    `factory` is "module:function", a function without arguments that returns the app
    (through `served`): each of the `workers` processes imports and calls it (so
    settings come from the environment, which the workers inherit). With more than one
    worker, metrics must be shared before anything imports prometheus_client
    (`carelog serve` does that).
    """
    from granian import Granian
    from granian.constants import Interfaces, Loops
    from granian.log import LogLevels

    Granian(
        factory,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        factory=True,
        workers=workers,
        loop=Loops.uvloop,
        log_access=False,
        log_level=LogLevels.warning,
        respawn_failed_workers=True,
        workers_kill_timeout=5,
    ).serve()


class _QuietServer(uvicorn.Server):
    """Leaves SIGTERM and SIGINT to the worker that embeds it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HealthServer:
    """A worker's health and metrics endpoint, served inside its own event loop."""

    def __init__(self, checks: Mapping[str, Check | Soft], host: str, port: int):
        app = Litestar(
            route_handlers=[*health_routes(checks), MetricsController], logging_config=None
        )
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


async def serve_health(checks: Mapping[str, Check | Soft], host: str, port: int) -> HealthServer:
    """Starts a worker's health and metrics endpoint; `await .stop()` at shutdown."""
    return await HealthServer(checks, host, port).start()
