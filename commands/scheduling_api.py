"""The command API's appointments routes: clinicians (admin) and appointments.

As for patients: each handler takes its typed body, the injected service and the
correlation id, and calls one use case in a worker thread. Field rules live in the
domain's parsers (`domain.scheduling`); a body that fails its typed decoding is
re-checked by the same parser, so every bad field is named at once.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any
from uuid import UUID

import msgspec
import structlog
from litestar import Request, Response, delete, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from commands import idempotency
from commands.api import COMMANDS, POSITION_HEADER, expected_version, once
from commands.scheduling import NotYourAppointment, Saved, SchedulingService, TimeOffNotFound
from domain.roles import APPOINTMENT_ATTENDERS, APPOINTMENT_BOOKERS, CLINICIAN_ADMINS, Role
from domain.scheduling import (
    DURATION_MAX,
    DURATION_MIN,
    DURATION_STEP,
    REASON_MAX,
    Appointment,
    AppointmentNotFound,
    AppointmentStatus,
    Clinician,
    ClinicianNotFound,
    InvalidTransition,
    SchedulingError,
    parse_booking,
    parse_cancellation,
    parse_clinician,
    parse_reschedule,
    parse_time_off,
    parse_user_link,
    parse_working_hours,
)
from runtime.http import BODY_ERRORS, DOCS, EMAIL_FORMAT, Documented, Problems, every_error, problem
from runtime.http import correlation_id as correlation_of
from runtime.security import Claims, requires
from runtime.threads import in_thread

log = structlog.get_logger(__name__)

Hours = dict[str, list[list[str]]]
Instant = Annotated[str, msgspec.Meta(description="RFC 3339 with an offset, on a whole minute")]
Duration = Annotated[int, msgspec.Meta(ge=DURATION_MIN, le=DURATION_MAX, multiple_of=DURATION_STEP)]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=REASON_MAX)]


InstantOut = Annotated[
    str, msgspec.Meta(description="RFC 3339", extra_json_schema={"extra": {"format": "date-time"}})
]


class TimeOffOut(msgspec.Struct, kw_only=True):
    id: UUID
    start: InstantOut
    end: InstantOut


class ClinicianOut(msgspec.Struct, rename="camel", kw_only=True):
    """A clinician as a write answers it."""

    id: UUID
    name: str
    email: Annotated[str, msgspec.Meta(extra_json_schema=EMAIL_FORMAT)]
    timezone: str
    working_hours: Hours
    time_off: list[TimeOffOut]
    user_id: UUID | None
    version: int
    position: int | None


class TimeOffAdded(msgspec.Struct, rename="camel", kw_only=True):
    time_off_id: UUID
    clinician: ClinicianOut


class AppointmentOut(msgspec.Struct, rename="camel", kw_only=True):
    """An appointment as a write answers it."""

    id: UUID
    patient_id: UUID
    clinician_id: UUID
    start: InstantOut
    end: InstantOut
    duration_minutes: int
    reason: str
    status: AppointmentStatus
    cancellation_reason: str | None
    version: int
    position: int | None


_CONCURRENT = "A concurrent change won; read again and retry"
_STALE = "If-Match names a version that is no longer current"


def _answers(what: str, *, conflict: str = _CONCURRENT, stale: bool = False) -> Documented:
    problems = {404: f"No such {what} (or the id is not a UUID)", 409: conflict}
    if stale:
        problems[412] = _STALE
    return Documented(problems=problems, if_match=stale, etag=True, position=True)


_APPOINTMENT_CONFLICT = (
    "The appointment's status does not allow this, its new time is taken, or a concurrent"
    " change won (`reason` says which)"
)


class _Input(msgspec.Struct, rename="camel", kw_only=True, forbid_unknown_fields=True):
    pass


class ClinicianInput(_Input):
    name: str
    email: str
    timezone: Annotated[str, msgspec.Meta(examples=["Europe/London"])]
    working_hours: Annotated[
        Hours,
        msgspec.Meta(
            description='Weekday (mon..sun) → [start, end) local "HH:MM" pairs',
            examples=[{"mon": [["09:00", "17:00"]]}],
        ),
    ]


class WorkingHoursInput(_Input):
    working_hours: Hours


class TimeOffInput(_Input):
    start: Instant
    end: Instant


class UserLinkInput(_Input):
    user_id: Annotated[str, msgspec.Meta(description="An auth user with the clinician role")]


class BookingInput(_Input):
    patient_id: str
    clinician_id: str
    start: Instant
    duration_minutes: Duration
    reason: Reason


class RescheduleInput(_Input):
    start: Instant
    duration_minutes: Duration | None = None


class CancelInput(_Input):
    reason: Reason


def _now() -> datetime:
    return datetime.now(UTC)


def _wire(data: msgspec.Struct) -> dict[str, Any]:
    return msgspec.to_builtins(data)


def _clinician_of(body: Mapping[str, Any]) -> Any:
    return parse_clinician(
        name=body.get("name"),
        email=body.get("email"),
        timezone=body.get("timezone"),
        working_hours=body.get("workingHours"),
    )


def _booking_of(body: Mapping[str, Any]) -> Any:
    return parse_booking(
        patient_id=body.get("patientId"),
        clinician_id=body.get("clinicianId"),
        start=body.get("start"),
        duration_minutes=body.get("durationMinutes"),
        reason=body.get("reason"),
        now=_now(),
    )


def _id(raw: str, missing: type[Exception]) -> UUID:
    try:
        return UUID(raw)
    except ValueError:
        raise missing(raw) from None


def _headers(saved: Saved) -> dict[str, str]:
    headers = {"ETag": f'"{saved.version}"'}
    if saved.position is not None:
        headers[POSITION_HEADER] = str(saved.position)
    return headers


def clinician_view(clinician: Clinician, saved: Saved | None = None) -> ClinicianOut:
    return ClinicianOut(
        id=clinician.id,
        name=clinician.name,
        email=clinician.email,
        timezone=clinician.timezone,
        working_hours=clinician.working_hours.to_wire(),
        time_off=[
            TimeOffOut(id=k, start=v[0].isoformat(), end=v[1].isoformat())
            for k, v in sorted(clinician.time_off.items(), key=lambda item: item[1])
        ],
        user_id=getattr(clinician, "user_id", None) or None,
        version=clinician.version,
        position=saved.position if saved else None,
    )


def appointment_view(appointment: Appointment, saved: Saved) -> AppointmentOut:
    return AppointmentOut(
        id=appointment.id,
        patient_id=appointment.patient_id,
        clinician_id=appointment.clinician_id,
        start=appointment.start.isoformat(),
        end=appointment.end.isoformat(),
        duration_minutes=appointment.duration_minutes,
        reason=appointment.reason,
        status=appointment.status,
        cancellation_reason=appointment.cancellation_reason,
        version=appointment.version,
        position=saved.position,
    )


async def _run(call: Callable[[], Saved], command: str) -> Saved:
    saved = await in_thread(call)
    COMMANDS.labels(command, "ok").inc()
    log.info(command, aggregate_id=str(saved.id), position=saved.position)
    return saved


# --- clinicians -------------------------------------------------------------------------


@post(
    "/clinicians",
    summary="Register a clinician",
    tags=["clinicians"],
    status_code=201,
    guards=[requires(CLINICIAN_ADMINS)],
    opt={
        BODY_ERRORS: every_error(ClinicianInput, _clinician_of),
        DOCS: Documented(problems={409: _CONCURRENT}, etag=True, position=True, location=True),
    },
)
async def register_clinician(
    data: JSONBody[ClinicianInput],
    scheduling: NamedDependency[SchedulingService],
    request: Request[Any, Any, Any],
) -> Response[ClinicianOut]:
    correlation_id = correlation_of(request.scope)
    details = _clinician_of(_wire(data))
    saved = await _run(
        lambda: scheduling.register_clinician(details, correlation_id), "RegisterClinician"
    )
    headers = {**_headers(saved), "Location": f"/clinicians/{saved.id}"}
    return Response(clinician_view(saved.aggregate, saved), status_code=201, headers=headers)


@put(
    "/clinicians/{clinician_id:str}/working-hours",
    summary="Change a clinician's weekly working hours",
    tags=["clinicians"],
    guards=[requires(CLINICIAN_ADMINS)],
    opt={
        BODY_ERRORS: every_error(
            WorkingHoursInput, lambda b: parse_working_hours(b.get("workingHours"))
        ),
        DOCS: _answers("clinician", stale=True),
    },
)
async def change_working_hours(
    clinician_id: FromPath[str],
    data: JSONBody[WorkingHoursInput],
    request: Request[Any, Any, Any],
    scheduling: NamedDependency[SchedulingService],
) -> Response[ClinicianOut]:
    correlation_id = correlation_of(request.scope)
    cid = _id(clinician_id, ClinicianNotFound)
    expected = expected_version(request)
    hours = parse_working_hours(_wire(data)["workingHours"])
    saved = await _run(
        lambda: scheduling.change_working_hours(cid, hours, expected, correlation_id),
        "ChangeWorkingHours",
    )
    return Response(clinician_view(saved.aggregate, saved), headers=_headers(saved))


@post(
    "/clinicians/{clinician_id:str}/time-off",
    summary="Add time off",
    tags=["clinicians"],
    status_code=201,
    guards=[requires(CLINICIAN_ADMINS)],
    opt={
        BODY_ERRORS: every_error(
            TimeOffInput, lambda b: parse_time_off(start=b.get("start"), end=b.get("end"))
        ),
        DOCS: _answers("clinician"),
    },
)
async def add_time_off(
    clinician_id: FromPath[str],
    data: JSONBody[TimeOffInput],
    scheduling: NamedDependency[SchedulingService],
    request: Request[Any, Any, Any],
) -> Response[TimeOffAdded]:
    correlation_id = correlation_of(request.scope)
    cid = _id(clinician_id, ClinicianNotFound)
    start, end = parse_time_off(start=data.start, end=data.end)
    chosen: list[UUID] = []

    def call() -> Saved:
        time_off_id, saved = scheduling.add_time_off(cid, start, end, None, correlation_id)
        chosen.append(time_off_id)
        return saved

    saved = await _run(call, "AddTimeOff")
    body = TimeOffAdded(time_off_id=chosen[0], clinician=clinician_view(saved.aggregate, saved))
    return Response(body, status_code=201, headers=_headers(saved))


@delete(
    "/clinicians/{clinician_id:str}/time-off/{time_off_id:str}",
    summary="Remove time off",
    tags=["clinicians"],
    guards=[requires(CLINICIAN_ADMINS)],
    opt={DOCS: _answers("clinician or time off")},
)
async def remove_time_off(
    clinician_id: FromPath[str],
    time_off_id: FromPath[str],
    scheduling: NamedDependency[SchedulingService],
    request: Request[Any, Any, Any],
) -> Response[None]:
    correlation_id = correlation_of(request.scope)
    cid = _id(clinician_id, ClinicianNotFound)
    tid = _id(time_off_id, TimeOffNotFound)
    saved = await _run(
        lambda: scheduling.remove_time_off(cid, tid, correlation_id), "RemoveTimeOff"
    )
    return Response(None, status_code=204, headers=_headers(saved))


@put(
    "/clinicians/{clinician_id:str}/user",
    summary="Link a clinician to the auth user who signs in as them",
    tags=["clinicians"],
    guards=[requires(CLINICIAN_ADMINS)],
    opt={
        BODY_ERRORS: every_error(UserLinkInput, lambda b: parse_user_link(user_id=b.get("userId"))),
        DOCS: _answers("clinician"),
    },
)
async def link_user(
    clinician_id: FromPath[str],
    data: JSONBody[UserLinkInput],
    scheduling: NamedDependency[SchedulingService],
    request: Request[Any, Any, Any],
) -> Response[ClinicianOut]:
    correlation_id = correlation_of(request.scope)
    cid = _id(clinician_id, ClinicianNotFound)
    user = parse_user_link(user_id=data.user_id)
    saved = await _run(lambda: scheduling.link_user(cid, user, correlation_id), "LinkUser")
    return Response(clinician_view(saved.aggregate, saved), headers=_headers(saved))


# --- appointments -----------------------------------------------------------------------


@post(
    "/appointments",
    summary="Book an appointment",
    description="409 with `reason`: clinician-busy, patient-busy, outside-working-hours, "
    "patient-removed. Unknown patient or clinician ids are 400.",
    tags=["appointments"],
    status_code=201,
    guards=[requires(APPOINTMENT_BOOKERS)],
    opt={
        BODY_ERRORS: every_error(BookingInput, _booking_of),
        DOCS: Documented(
            problems={409: _APPOINTMENT_CONFLICT},
            etag=True,
            position=True,
            location=True,
            idempotency_key=idempotency.KEY_PATTERN,
        ),
    },
)
async def book_appointment(
    data: JSONBody[BookingInput],
    scheduling: NamedDependency[SchedulingService],
    request: Request[Any, Any, Any],
) -> Response[AppointmentOut]:
    correlation_id = correlation_of(request.scope)
    key = idempotency.key_of(request.headers)
    booking = _booking_of(_wire(data))

    def book() -> Saved:
        appointment_id = once(idempotency.BOOK_APPOINTMENT, key, request, data)
        return scheduling.book(booking, correlation_id, appointment_id)

    saved = await _run(book, "BookAppointment")
    headers = {**_headers(saved), "Location": f"/appointments/{saved.id}"}
    return Response(appointment_view(saved.aggregate, saved), status_code=201, headers=headers)


def _timing_of(body: Mapping[str, Any], current: int | None = None) -> Any:
    return parse_reschedule(
        start=body.get("start"),
        duration_minutes=body.get("durationMinutes", current or DURATION_MIN),
        now=_now(),
    )


@post(
    "/appointments/{appointment_id:str}/reschedule",
    summary="Move a booked appointment",
    description="`durationMinutes` defaults to the current length. Optional `If-Match`.",
    tags=["appointments"],
    status_code=200,
    guards=[requires(APPOINTMENT_BOOKERS)],
    opt={
        BODY_ERRORS: every_error(RescheduleInput, _timing_of),
        DOCS: _answers("appointment", conflict=_APPOINTMENT_CONFLICT, stale=True),
    },
)
async def reschedule_appointment(
    appointment_id: FromPath[str],
    data: JSONBody[RescheduleInput],
    request: Request[Any, Any, Any],
    scheduling: NamedDependency[SchedulingService],
) -> Response[AppointmentOut]:
    correlation_id = correlation_of(request.scope)
    aid = _id(appointment_id, AppointmentNotFound)
    expected = expected_version(request)

    def call() -> Saved:
        current = scheduling.appointment(aid).duration_minutes
        body = _wire(data)
        if body.get("durationMinutes") is None:
            body["durationMinutes"] = current
        return scheduling.reschedule(aid, _timing_of(body), expected, correlation_id)

    saved = await _run(call, "RescheduleAppointment")
    return Response(appointment_view(saved.aggregate, saved), headers=_headers(saved))


@post(
    "/appointments/{appointment_id:str}/cancel",
    summary="Cancel a booked appointment",
    tags=["appointments"],
    status_code=200,
    guards=[requires(APPOINTMENT_BOOKERS)],
    opt={
        BODY_ERRORS: every_error(CancelInput, lambda b: parse_cancellation(reason=b.get("reason"))),
        DOCS: _answers("appointment", conflict=_APPOINTMENT_CONFLICT, stale=True),
    },
)
async def cancel_appointment(
    appointment_id: FromPath[str],
    data: JSONBody[CancelInput],
    request: Request[Any, Any, Any],
    scheduling: NamedDependency[SchedulingService],
) -> Response[AppointmentOut]:
    correlation_id = correlation_of(request.scope)
    aid = _id(appointment_id, AppointmentNotFound)
    expected = expected_version(request)
    reason = parse_cancellation(reason=data.reason)
    saved = await _run(
        lambda: scheduling.cancel(aid, reason, expected, correlation_id), "CancelAppointment"
    )
    return Response(appointment_view(saved.aggregate, saved), headers=_headers(saved))


def _attending(action: str, summary: str) -> Any:
    @post(
        f"/appointments/{{appointment_id:str}}/{action}",
        summary=summary,
        description="A clinician may act only on their own appointments (403). Optional If-Match.",
        tags=["appointments"],
        status_code=200,
        guards=[requires(APPOINTMENT_ATTENDERS)],
        name=f"appointment-{action}",
        opt={DOCS: _answers("appointment", conflict=_APPOINTMENT_CONFLICT, stale=True)},
    )
    async def attend(
        appointment_id: FromPath[str],
        request: Request[Any, Any, Any],
        scheduling: NamedDependency[SchedulingService],
    ) -> Response[AppointmentOut]:
        correlation_id = correlation_of(request.scope)
        aid = _id(appointment_id, AppointmentNotFound)
        expected = expected_version(request)
        claims: Claims = request.state.claims
        actor = UUID(claims.subject) if claims.role == Role.CLINICIAN else None
        saved = await _run(
            lambda: scheduling.attend(aid, action, expected, actor, correlation_id),
            f"Appointment:{action}",
        )
        return Response(appointment_view(saved.aggregate, saved), headers=_headers(saved))

    return attend


check_in = _attending("check-in", "Check a patient in")
complete = _attending("complete", "Complete a checked-in appointment")
no_show = _attending("no-show", "Mark a booked appointment as a no-show")

ROUTES = [
    register_clinician,
    change_working_hours,
    add_time_off,
    remove_time_off,
    link_user,
    book_appointment,
    reschedule_appointment,
    cancel_appointment,
    check_in,
    complete,
    no_show,
]


_CONFLICTS = {
    "clinician-busy": "the clinician has another appointment then",
    "patient-busy": "the patient has another appointment then",
    "outside-working-hours": "the clinician does not work then, or has time off",
    "patient-removed": "the patient has been removed",
    "invalid-transition": "the appointment's status does not allow this",
}


def _conflict(exc: SchedulingError) -> Any:
    extra: dict[str, Any] = {"reason": exc.reason}
    conflicting = getattr(exc, "appointment_id", None)
    if conflicting is not None:
        extra["conflictingAppointmentId"] = str(conflicting)
    if isinstance(exc, InvalidTransition):
        extra["currentStatus"] = exc.current_status
    return problem(409, _CONFLICTS.get(exc.reason, "conflict"), **extra)


def _not_found(what: str) -> Callable[[Any], Any]:
    return lambda exc: problem(404, f"no such {what}")


PROBLEMS: Problems = {
    SchedulingError: _conflict,
    AppointmentNotFound: _not_found("appointment"),
    ClinicianNotFound: _not_found("clinician"),
    TimeOffNotFound: _not_found("time off"),
    NotYourAppointment: lambda exc: problem(403, "not one of your appointments"),
}
