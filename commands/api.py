"""The command API (port 4000): register, change and remove patients.

Each handler takes its typed body and its injected service, calls one use case of
`PatientService` in a worker thread (the event store's driver is synchronous) and
maps the outcome. Field rules live in the domain's parsers (`domain.patients`):
`PatientInput` declares the same limits for the wire and the published schema, and
a body that fails it is re-checked by the parser so that every bad field is named.
Errors map to problems in `PROBLEMS`, in one place.
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
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, JSONBody
from prometheus_client import Counter

from commands import idempotency
from commands.idempotency import IdempotencyKeys, KeyReused
from commands.scheduling import SchedulingService
from commands.service import PatientService, Written, today
from commands.store import CACHE_SIZE, EventStore
from domain.errors import EmailTaken, InvalidData, PatientErased, PatientNotFound, StaleVersion
from domain.patients import (
    ADDRESS_MAX,
    EMAIL_MAX,
    ERASE_REASON_MAX,
    NAME_MAX,
    parse_change,
    parse_erasure,
    parse_registration,
)
from domain.roles import PATIENT_ERASERS, PATIENT_WRITERS
from runtime.crypto import Keyring, SubjectErased
from runtime.http import (
    BODY_ERRORS,
    DOCS,
    EMAIL_FORMAT,
    Documented,
    Problems,
    every_error,
    problem,
    service_app,
)
from runtime.http import correlation_id as correlation_of
from runtime.security import TokenVerifier, requires
from runtime.settings import Settings
from runtime.threads import in_thread

log = structlog.get_logger(__name__)
T = TypeVar("T")

COMMANDS = Counter("carelog_commands_total", "Commands handled, by outcome", ["command", "outcome"])

MAX_BODY_BYTES = 64 * 1024
POSITION_HEADER = "Event-Position"


class PatientInput(msgspec.Struct, rename="camel", kw_only=True, forbid_unknown_fields=True):
    """A patient's fields as a client sends them (`registeredDate` only on register)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=NAME_MAX)]
    email: Annotated[
        str,
        msgspec.Meta(
            max_length=EMAIL_MAX, examples=["ada@example.org"], extra_json_schema=EMAIL_FORMAT
        ),
    ]
    address: Annotated[str, msgspec.Meta(min_length=1, max_length=ADDRESS_MAX)]
    date_of_birth: Annotated[date, msgspec.Meta(description="ISO date, not in the future")]
    registered_date: Annotated[
        date | None, msgspec.Meta(description="ISO date; required on register, ignored on change")
    ] = None


class PatientOut(msgspec.Struct, rename="camel", kw_only=True):
    """A patient as a write answers it: its new version and the event's position."""

    id: UUID
    name: str
    email: Annotated[str, msgspec.Meta(extra_json_schema=EMAIL_FORMAT)]
    address: str
    date_of_birth: date
    registered_date: date
    version: int
    position: Annotated[
        int | None, msgspec.Meta(description="The event's position: pass it as minPosition")
    ]


class PreferencesOut(msgspec.Struct, kw_only=True):
    """A patient's mail preferences as a write answers them."""

    id: UUID
    reminders: bool
    version: int
    position: int | None


_WRITE = {
    404: "No such patient (or the id is not a UUID)",
    410: "The patient was erased",
    409: "The email is in use by another patient, or a concurrent change won",
    412: "If-Match names a version that is no longer the patient's (ETag: the current one)",
}


_ETAG = re.compile(r'^(?:W/)?"?(\d{1,18})"?$')


def _parse(body: dict[str, Any], parse: Callable[..., T]) -> T:
    """Runs a domain parser over a patient's fields (camelCase, as on the wire)."""
    return parse(
        name=body.get("name"),
        email=body.get("email"),
        address=body.get("address"),
        date_of_birth=body.get("dateOfBirth"),
        registered_date=body.get("registeredDate"),
        today=today(),
    )


def _fields(data: JSONBody[PatientInput]) -> dict[str, Any]:
    return {
        "name": data.name,
        "email": data.email,
        "address": data.address,
        "dateOfBirth": data.date_of_birth,
        "registeredDate": data.registered_date,
    }


def expected_version(request: Request[Any, Any, Any]) -> int | None:
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


def _representation(written: Written) -> PatientOut:
    patient = written.patient
    return PatientOut(
        id=patient.id,
        name=patient.name,
        email=patient.email,
        address=patient.address,
        date_of_birth=patient.date_of_birth,
        registered_date=patient.registered_date,
        version=written.version,
        position=written.position,
    )


def _headers(written: Written) -> dict[str, str]:
    headers = {"ETag": f'"{written.version}"'}
    if written.position is not None:
        headers[POSITION_HEADER] = str(written.position)
    return headers


@post(
    "/patients",
    summary="Register a patient",
    tags=["patients"],
    status_code=201,
    guards=[requires(PATIENT_WRITERS)],
    opt={
        BODY_ERRORS: every_error(PatientInput, lambda b: _parse(b, parse_registration)),
        DOCS: Documented(
            problems={409: "The email is in use by another patient"},
            etag=True,
            position=True,
            location=True,
            idempotency_key=idempotency.KEY_PATTERN,
        ),
    },
)
async def register_patient(
    data: JSONBody[PatientInput],
    service: NamedDependency[PatientService],
    request: Request[Any, Any, Any],
) -> Response[PatientOut]:
    correlation_id = correlation_of(request.scope)
    key = idempotency.key_of(request.headers)
    details, registered = _parse(_fields(data), parse_registration)

    def register() -> Written:
        patient_id = once(idempotency.REGISTER_PATIENT, key, request, data)
        return service.register(details, registered, correlation_id, patient_id)

    if key is None:
        written = await service.register_async(details, registered, correlation_id)
    else:
        written = await in_thread(register)
    COMMANDS.labels("RegisterPatient", "ok").inc()
    log.info("patient registered", patient_id=str(written.patient_id), position=written.position)
    headers = _headers(written)
    headers["Location"] = f"/patients/{written.patient_id}"
    return Response(_representation(written), status_code=201, headers=headers)


@put(
    "/patients/{patient_id:str}",
    summary="Change a patient's details",
    description="Send `If-Match` with the ETag you read to refuse a lost update (412).",
    tags=["patients"],
    guards=[requires(PATIENT_WRITERS)],
    opt={
        BODY_ERRORS: every_error(PatientInput, lambda b: _parse(b, parse_change)),
        DOCS: Documented(problems=_WRITE, if_match=True, etag=True, position=True),
    },
)
async def change_patient(
    patient_id: FromPath[str],
    data: JSONBody[PatientInput],
    request: Request[Any, Any, Any],
    service: NamedDependency[PatientService],
) -> Response[PatientOut]:
    correlation_id = correlation_of(request.scope)
    pid = _patient_id(patient_id)
    expected = expected_version(request)
    details = _parse(_fields(data), parse_change)
    written = await service.change_async(pid, details, expected, correlation_id)
    COMMANDS.labels("ChangePatientDetails", "ok").inc()
    log.info("patient changed", patient_id=str(pid), position=written.position)
    return Response(_representation(written), headers=_headers(written))


@delete(
    "/patients/{patient_id:str}",
    summary="Remove a patient",
    tags=["patients"],
    guards=[requires(PATIENT_WRITERS)],
    opt={DOCS: Documented(problems=_WRITE, if_match=True, etag=True, position=True)},
)
async def remove_patient(
    patient_id: FromPath[str],
    request: Request[Any, Any, Any],
    service: NamedDependency[PatientService],
) -> Response[None]:
    correlation_id = correlation_of(request.scope)
    pid = _patient_id(patient_id)
    expected = expected_version(request)
    written = await in_thread(service.remove, pid, expected, correlation_id)
    COMMANDS.labels("RemovePatient", "ok").inc()
    log.info("patient removed", patient_id=str(pid), position=written.position)
    return Response(None, status_code=204, headers=_headers(written))


class PreferencesInput(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Mail the patient wants beyond what they asked for (confirmations always go)."""

    reminders: bool


def _preferences(body: dict[str, Any]) -> bool:
    if not isinstance(body.get("reminders"), bool):
        raise InvalidData({"reminders": "must be true or false"})
    return bool(body["reminders"])


@put(
    "/patients/{patient_id:str}/preferences",
    summary="Set a patient's mail preferences (opt out of reminders)",
    tags=["patients"],
    guards=[requires(PATIENT_WRITERS)],
    opt={
        BODY_ERRORS: every_error(PreferencesInput, _preferences),
        DOCS: Documented(
            problems={
                404: _WRITE[404],
                409: "A concurrent change won",
                410: _WRITE[410],
                412: _WRITE[412],
            },
            if_match=True,
            etag=True,
            position=True,
        ),
    },
)
async def set_preferences(
    patient_id: FromPath[str],
    data: JSONBody[PreferencesInput],
    request: Request[Any, Any, Any],
    service: NamedDependency[PatientService],
) -> Response[PreferencesOut]:
    correlation_id = correlation_of(request.scope)
    pid = _patient_id(patient_id)
    expected = expected_version(request)
    written = await in_thread(
        service.set_preferences, pid, data.reminders, expected, correlation_id
    )
    COMMANDS.labels("SetPreferences", "ok").inc()
    body = PreferencesOut(
        id=pid,
        reminders=written.patient.reminders,
        version=written.version,
        position=written.position,
    )
    return Response(body, headers=_headers(written))


def once(
    operation: str,
    key: str | None,
    request: Request[Any, Any, Any],
    data: msgspec.Struct,
) -> UUID | None:
    """The id an idempotent create's resource gets (None without a key): reserved under
    the caller's key, so a retry of the request gets the same one. The keys are the
    app's (`app.state`), not a dependency: a handler with two dependencies has Litestar
    resolve them in a task group, a cost on every request."""
    if key is None:
        return None
    keys: IdempotencyKeys = request.app.state[idempotency.STATE_KEY]
    actor = str(request.state.claims.subject)
    return keys.reserve(operation, actor, key, idempotency.body_hash(msgspec.json.encode(data)))


class ErasureInput(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Why the patient is erased: a request reference, never personal data (it is kept)."""

    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=ERASE_REASON_MAX)]


class ErasureOut(msgspec.Struct, kw_only=True):
    """The erasure as recorded: the patient's new version and the event's position."""

    id: UUID
    erased: bool
    version: int
    position: int | None


@post(
    "/patients/{patient_id:str}/erase",
    summary="Erase a patient (destroys their data key)",
    description=(
        "Destroys the patient's data key: every copy of their personal fields (event store,"
        " snapshots, Kafka, read models) becomes unreadable for good, and reads of the patient"
        " answer 410. The history (ids, event types, times) stays. `reason` is kept in the"
        " erasure's event: give a request reference, never personal data."
    ),
    tags=["patients"],
    status_code=200,
    guards=[requires(PATIENT_ERASERS)],
    opt={
        BODY_ERRORS: every_error(ErasureInput, lambda b: parse_erasure(reason=b.get("reason"))),
        DOCS: Documented(
            problems={404: _WRITE[404], 409: "A concurrent change won", 410: _WRITE[410]},
            etag=True,
            position=True,
        ),
    },
)
async def erase_patient(
    patient_id: FromPath[str],
    data: JSONBody[ErasureInput],
    request: Request[Any, Any, Any],
    service: NamedDependency[PatientService],
) -> Response[ErasureOut]:
    correlation_id = correlation_of(request.scope)
    pid = _patient_id(patient_id)
    reason = parse_erasure(reason=data.reason)
    erased_by = request.state.claims.subject
    written = await in_thread(service.erase, pid, reason, erased_by, correlation_id)
    COMMANDS.labels("ErasePatient", "ok").inc()
    log.info("patient erased", patient_id=str(pid), position=written.position)
    body = ErasureOut(id=pid, erased=True, version=written.version, position=written.position)
    return Response(body, headers=_headers(written))


def _counted(outcome: str, make: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def convert(exc: Any) -> Any:
        COMMANDS.labels("any", outcome).inc()
        return make(exc)

    return convert


PROBLEMS: Problems = {
    InvalidData: _counted(
        "invalid", lambda exc: problem(400, "invalid request", errors=exc.errors)
    ),
    PatientNotFound: lambda exc: problem(404, "no such patient"),
    PatientErased: lambda exc: problem(410, "the patient was erased"),
    SubjectErased: lambda exc: problem(410, "the patient was erased"),
    EmailTaken: _counted(
        "conflict",
        lambda exc: problem(409, "email already registered", errors={"email": "is already in use"}),
    ),
    StaleVersion: _counted(
        "stale",
        lambda exc: problem(
            412,
            "the patient has changed since you read it",
            headers={"ETag": f'"{exc.actual}"'},
            currentVersion=exc.actual,
        ),
    ),
    IntegrityError: _counted(
        "conflict", lambda exc: problem(409, "a concurrent change won; read again and retry")
    ),
    KeyReused: _counted(
        "key-reused",
        lambda exc: problem(
            422,
            "this Idempotency-Key came before with another body",
            errors={idempotency.HEADER: "was used with another request body"},
        ),
    ),
}


def create_app(
    settings: Settings, store: EventStore | None = None, verifier: TokenVerifier | None = None
) -> Litestar:
    """The command API; builds its event store at startup unless one is given.

    Tokens are checked with `verifier`, by default against the auth service's JWKS.
    """
    from commands import scheduling_api  # its routes use this module's shared pieces

    built: list[tuple[PatientService, SchedulingService]] = []

    async def start(app: Litestar) -> None:
        # SettingsError (CARELOG_CLAIM_KEY unset): the app refuses to start without it.
        claim_key = settings.claim_secret()
        event_store = store
        if event_store is None:
            keyring = Keyring.from_settings(settings)
            keyring.listen()
            event_store = await anyio.to_thread.run_sync(
                lambda: EventStore(settings.database_url, cache_size=CACHE_SIZE, keyring=keyring)
            )
        patients = PatientService(event_store, claim_key)
        # One group-commit queue for every write, so concurrent commands share commits.
        scheduling = SchedulingService(event_store, patients.writer)
        built.append((patients, scheduling))
        app.state[idempotency.STATE_KEY] = IdempotencyKeys(event_store)

    async def stop(app: Litestar) -> None:
        if store is None and built:
            await anyio.to_thread.run_sync(built[0][0].store.close)
            if built[0][0].store.keyring is not None:
                await anyio.to_thread.run_sync(built[0][0].store.keyring.close)

    def patient_service() -> PatientService:
        return built[0][0]

    def scheduling_service() -> SchedulingService:
        return built[0][1]

    async def database() -> None:
        await anyio.to_thread.run_sync(built[0][0].store.recorder.max_notification_id)

    return service_app(
        "commands",
        [
            register_patient,
            change_patient,
            remove_patient,
            set_preferences,
            erase_patient,
            *scheduling_api.ROUTES,
        ],
        title="commands",
        description="Writes: every change is an event in the event store.",
        tags=["patients", "clinicians", "appointments"],
        problems={**PROBLEMS, **scheduling_api.PROBLEMS},
        checks={"database": database},
        dependencies={
            "service": Provide(patient_service, sync_to_thread=False),
            "scheduling": Provide(scheduling_service, sync_to_thread=False),
        },
        on_startup=[start],
        on_shutdown=[stop],
        max_body_bytes=MAX_BODY_BYTES,
        state={"verifier": verifier or TokenVerifier.from_settings(settings)},
    )
