"""The command API (port 4000): register, change and remove patients.

Each handler decodes its input, calls one use case of `PatientService` in a worker
thread (the event store's driver is synchronous), and maps the outcome. Errors are
mapped to statuses in `ERRORS`, in one place.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import date
from typing import Annotated, Any, TypeVar
from uuid import UUID

import anyio
import msgspec
import structlog
from eventsourcing.persistence import IntegrityError
from litestar import Litestar, Request, Response, delete, post, put
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Tag
from litestar.params import FromPath
from prometheus_client import Counter

from commands.service import PatientService, Written, today
from commands.store import EventStore
from domain.errors import EmailTaken, InvalidData, PatientNotFound, StaleVersion
from domain.patients import ADDRESS_MAX, EMAIL_MAX, NAME_MAX, parse_change, parse_registration
from domain.roles import PATIENT_WRITERS
from runtime.http import (
    EXCEPTION_HANDLERS,
    bind_correlation_id,
    echo_correlation_id,
    json_body_operation,
    metrics_middleware,
    operational_routes,
    problem,
)
from runtime.http import (
    correlation_id as correlation_id_of,
)
from runtime.security import TokenVerifier, requires
from runtime.settings import Settings

log = structlog.get_logger(__name__)
T = TypeVar("T")

COMMANDS = Counter("carelog_commands_total", "Commands handled, by outcome", ["command", "outcome"])

MAX_BODY_BYTES = 64 * 1024
POSITION_HEADER = "Event-Position"


class PatientInput(msgspec.Struct, rename="camel", kw_only=True):
    """A patient's fields as a client sends them (`registeredDate` only on register)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=NAME_MAX)]
    email: Annotated[str, msgspec.Meta(max_length=EMAIL_MAX, examples=["ada@example.org"])]
    address: Annotated[str, msgspec.Meta(min_length=1, max_length=ADDRESS_MAX)]
    date_of_birth: Annotated[date, msgspec.Meta(description="ISO date, not in the future")]
    registered_date: Annotated[
        date | None, msgspec.Meta(description="ISO date; required on register, ignored on change")
    ] = None


_FIELDS = frozenset(PatientInput.__struct_encode_fields__)
_ETAG = re.compile(r'^(?:W/)?"?(\d{1,18})"?$')


def _decode_object(raw: bytes) -> tuple[dict[str, Any], dict[str, str]]:
    """The body as a JSON object, and an error for each field the API does not know."""
    if not raw.strip():
        raise InvalidData({"body": "a JSON object is required"})
    try:
        value = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise InvalidData({"body": f"malformed JSON: {exc}"}) from None
    if not isinstance(value, dict):
        raise InvalidData({"body": "must be a JSON object"})
    return value, {key: "is not a known field" for key in sorted(set(value) - _FIELDS)}


def _parse(raw: bytes, parse: Callable[..., T]) -> T:
    """Runs a domain parser over the body, reporting its errors and unknown fields together."""
    body, errors = _decode_object(raw)
    try:
        parsed = parse(
            name=body.get("name"),
            email=body.get("email"),
            address=body.get("address"),
            date_of_birth=body.get("dateOfBirth"),
            registered_date=body.get("registeredDate"),
            today=today(),
        )
    except InvalidData as invalid:
        raise InvalidData({**invalid.errors, **errors}) from None
    if errors:
        raise InvalidData(errors)
    return parsed


def _expected_version(request: Request[Any, Any, Any]) -> int | None:
    header = request.headers.get("if-match")
    if header is None or header.strip() == "*":
        return None
    match = _ETAG.match(header.strip())
    if match is None:
        raise InvalidData({"If-Match": 'must be an ETag such as "3"'})
    return int(match.group(1))


def _patient_id(raw: str) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise PatientNotFound(raw) from None


def _representation(written: Written) -> dict[str, Any]:
    patient = written.patient
    return {
        "id": str(patient.id),
        "name": patient.name,
        "email": patient.email,
        "address": patient.address,
        "dateOfBirth": patient.date_of_birth.isoformat(),
        "registeredDate": patient.registered_date.isoformat(),
        "version": written.version,
        "position": written.position,
    }


def _headers(written: Written) -> dict[str, str]:
    headers = {"ETag": f'"{written.version}"'}
    if written.position is not None:
        headers[POSITION_HEADER] = str(written.position)
    return headers


def _service(state: State) -> PatientService:
    service: PatientService = state.service
    return service


@post(
    "/patients",
    summary="Register a patient",
    operation_class=json_body_operation(PatientInput),
    tags=["patients"],
    status_code=201,
    guards=[requires(PATIENT_WRITERS)],
)
async def register_patient(request: Request[Any, Any, Any], state: State) -> Response[Any]:
    details, registered = _parse(await request.body(), parse_registration)
    correlation_id = correlation_id_of(request.scope)
    written = await anyio.to_thread.run_sync(
        lambda: _service(state).register(details, registered, correlation_id)
    )
    COMMANDS.labels("RegisterPatient", "ok").inc()
    log.info("patient registered", patient_id=str(written.patient_id), position=written.position)
    headers = _headers(written)
    headers["Location"] = f"/patients/{written.patient_id}"
    return Response(_representation(written), status_code=201, headers=headers)


@put(
    "/patients/{patient_id:str}",
    summary="Change a patient's details",
    description="Send `If-Match` with the ETag you read to refuse a lost update (412).",
    operation_class=json_body_operation(PatientInput),
    tags=["patients"],
    guards=[requires(PATIENT_WRITERS)],
)
async def change_patient(
    patient_id: FromPath[str], request: Request[Any, Any, Any], state: State
) -> Response[Any]:
    pid = _patient_id(patient_id)
    expected = _expected_version(request)
    details = _parse(await request.body(), parse_change)
    correlation_id = correlation_id_of(request.scope)
    written = await anyio.to_thread.run_sync(
        lambda: _service(state).change(pid, details, expected, correlation_id)
    )
    COMMANDS.labels("ChangePatientDetails", "ok").inc()
    log.info("patient changed", patient_id=str(pid), position=written.position)
    return Response(_representation(written), headers=_headers(written))


@delete(
    "/patients/{patient_id:str}",
    summary="Remove a patient",
    tags=["patients"],
    guards=[requires(PATIENT_WRITERS)],
)
async def remove_patient(
    patient_id: FromPath[str], request: Request[Any, Any, Any], state: State
) -> Response[None]:
    pid = _patient_id(patient_id)
    expected = _expected_version(request)
    correlation_id = correlation_id_of(request.scope)
    written = await anyio.to_thread.run_sync(
        lambda: _service(state).remove(pid, expected, correlation_id)
    )
    COMMANDS.labels("RemovePatient", "ok").inc()
    log.info("patient removed", patient_id=str(pid), position=written.position)
    return Response(None, status_code=204, headers=_headers(written))


def _invalid(_: Request[Any, Any, Any], exc: InvalidData) -> Response[Any]:
    COMMANDS.labels("any", "invalid").inc()
    return problem(400, "invalid request", errors=exc.errors)


def _not_found(_: Request[Any, Any, Any], exc: PatientNotFound) -> Response[Any]:
    return problem(404, "no such patient")


def _email_taken(_: Request[Any, Any, Any], exc: EmailTaken) -> Response[Any]:
    COMMANDS.labels("any", "conflict").inc()
    return problem(409, "email already registered", errors={"email": "is already in use"})


def _stale(_: Request[Any, Any, Any], exc: StaleVersion) -> Response[Any]:
    COMMANDS.labels("any", "stale").inc()
    return problem(
        412,
        "the patient has changed since you read it",
        headers={"ETag": f'"{exc.actual}"'},
        currentVersion=exc.actual,
    )


def _conflict(_: Request[Any, Any, Any], exc: IntegrityError) -> Response[Any]:
    COMMANDS.labels("any", "conflict").inc()
    return problem(409, "a concurrent change won; read again and retry")


ERRORS: dict[Any, Any] = {
    InvalidData: _invalid,
    PatientNotFound: _not_found,
    EmailTaken: _email_taken,
    StaleVersion: _stale,
    IntegrityError: _conflict,
}


def create_app(
    settings: Settings, store: EventStore | None = None, verifier: TokenVerifier | None = None
) -> Litestar:
    """The command API; builds its event store at startup unless one is given.

    Tokens are checked with `verifier`, by default against the auth service's JWKS.
    """

    async def start(app: Litestar) -> None:
        app.state.store = store or await anyio.to_thread.run_sync(
            lambda: EventStore(settings.database_url)
        )
        app.state.service = PatientService(app.state.store)

    async def stop(app: Litestar) -> None:
        if store is None and getattr(app.state, "store", None) is not None:
            await anyio.to_thread.run_sync(app.state.store.close)

    async def database(app_state: State | None = None) -> None:
        await anyio.to_thread.run_sync(lambda: app.state.store.recorder.max_notification_id())

    app = Litestar(
        before_request=bind_correlation_id,
        before_send=[echo_correlation_id],
        logging_config=None,
        route_handlers=[
            register_patient,
            change_patient,
            remove_patient,
            *operational_routes({"database": database}),
        ],
        on_startup=[start],
        on_shutdown=[stop],
        exception_handlers={**EXCEPTION_HANDLERS, **ERRORS},
        middleware=[metrics_middleware("commands")],
        request_max_body_size=MAX_BODY_BYTES,
        openapi_config=OpenAPIConfig(
            title="carelog commands",
            version="1.0.0",
            description="Writes: every change is an event in the event store.",
            tags=[Tag(name="patients")],
            path="/schema",
        ),
    )
    app.state.verifier = verifier or TokenVerifier.from_settings(settings)
    return app
