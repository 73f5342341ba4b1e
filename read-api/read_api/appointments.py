"""The query API's appointments routes: appointments, clinicians and free slots.

Reads the appointments model through `readmodels.appointments`. Every role may read;
an appointment's reason is shown to admins and receptionists, and to a clinician on
their own appointments only (`domain.roles.REASON_READERS`); an answer that shows a
reason is recorded in the disclosure audit first (`runtime.audit`). `clinicianId=me` is
the clinician the caller signs in as.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import anyio
import msgspec
import psycopg_pool
from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.params import FromPath, Parameter

from domain.errors import InvalidData
from domain.privacy import is_sealed
from domain.roles import REASON_READERS, SCHEDULE_READERS, Role
from domain.scheduling import (
    DURATION_MAX,
    DURATION_MIN,
    DURATION_STEP,
    AppointmentNotFound,
    ClinicianNotFound,
    WorkingHours,
    free_slots_in,
    local_day_utc,
)
from read_api.queries import window_errors
from read_api.waiting import await_position
from readmodels import appointments as model
from runtime import audit
from runtime.crypto import Keyring
from runtime.http import DOCS, QUERY_RULES, Documented, Problems, answers, problem
from runtime.security import Claims, requires

Status = Literal["booked", "checked-in", "completed", "cancelled", "no-show"]


@dataclass(frozen=True)
class Appointments:
    """What the appointments queries read: the model's pool and how long to wait."""

    pool: psycopg_pool.AsyncConnectionPool[Any]
    read_wait_seconds: float
    tables: model.Tables = model.LIVE
    keyring: Keyring | None = None
    """Opens the sealed reasons the model keeps (an erased patient's open to None)."""


_encoder = msgspec.json.Encoder()


async def _await_position(source: Appointments, position: int | None) -> None:
    await await_position(source.pool, source.tables.positions, position, source.read_wait_seconds)


async def _own_clinician(source: Appointments, claims: Claims) -> UUID | None:
    try:
        user = UUID(claims.subject)
    except ValueError:
        return None
    async with source.pool.connection() as conn:
        return await model.clinician_of_user(conn, user, source.tables)


async def _shown(
    rows: list[model.AppointmentRow], claims: Claims, own: UUID | None, source: Appointments
) -> list[UUID]:
    """Withholds reasons the caller may not see, and opens the others (in place); the
    patients whose reasons stay shown, which the disclosure audit records."""
    patients = []
    for row in rows:
        if claims.role not in REASON_READERS or (
            claims.role == Role.CLINICIAN and row.clinician_id != own
        ):
            row.reason = None
            row.cancellation_reason = None
        elif row.reason is not None or row.cancellation_reason is not None:
            patients.append(row.patient_id)
    sealed = [row for row in rows if is_sealed(row.reason)]
    if sealed:
        keyring = source.keyring
        if keyring is None:
            raise RuntimeError("sealed reasons, and no keyring to open them")

        def opened() -> None:
            for row in sealed:
                row.reason = keyring.open(str(row.reason), "reason")

        await anyio.to_thread.run_sync(opened)
    return list(dict.fromkeys(patients))


class AppointmentsPage(msgspec.Struct, kw_only=True):
    appointments: list[model.AppointmentRow]
    next: str | None


class CliniciansPage(msgspec.Struct, kw_only=True):
    clinicians: list[model.ClinicianRow]
    next: str | None


class Slot(msgspec.Struct, kw_only=True):
    start: datetime
    end: datetime


class Slots(msgspec.Struct, kw_only=True):
    slots: list[Slot]


def _one(what: str, audited: bool = False) -> Documented:
    problems = {404: f"No such {what} (or the id is not a UUID)"}
    return Documented(problems=problems | (audit.UNAUDITED if audited else {}), etag=True)


MinPosition = Annotated[
    int | None, Parameter(ge=1, description="Answer only once the model reflects this position")
]


def _listing_errors(values: Mapping[str, Any]) -> dict[str, str]:
    """What is wrong with a listing's parameters (typed, wire names), beyond their types."""
    errors: dict[str, str] = {}
    clinician = values.get("clinicianId")
    if clinician is not None and clinician != "me":
        try:
            UUID(clinician)
        except ValueError:
            errors["clinicianId"] = "must be a UUID or me"
    errors |= window_errors(values)
    cursor = values.get("cursor")
    decoded = model.decode_cursor(cursor) if cursor else None
    if cursor and (decoded is None or decoded.sort != values.get("sort", "start")):
        errors["cursor"] = "is not a cursor of this listing; start again without it"
    return errors


def _listing_rules(values: Mapping[str, Any]) -> None:
    if errors := _listing_errors(values):
        raise InvalidData(errors)


@get(
    "/appointments",
    summary="List appointments",
    description="Keyset-paged by start time. `clinicianId=me`: the caller's own appointments.",
    tags=["appointments"],
    guards=[requires(SCHEDULE_READERS)],
    responses=answers(AppointmentsPage, "A page of appointments"),
    opt={DOCS: Documented(problems=audit.UNAUDITED), QUERY_RULES: _listing_rules},
)
async def list_appointments(
    request: Request[Any, Any, Any],
    source: NamedDependency[Appointments],
    patientId: Annotated[UUID | None, Parameter(description="Only this patient's")] = None,
    clinicianId: Annotated[
        str | None, Parameter(description="Only this clinician's, or `me`")
    ] = None,
    from_: Annotated[
        datetime | None, Parameter(query="from", description="Starting at or after (RFC 3339)")
    ] = None,
    to: Annotated[datetime | None, Parameter(description="Starting before (RFC 3339)")] = None,
    status: Annotated[Status | None, Parameter(description="Only this status")] = None,
    sort: Annotated[Literal["start", "-start"], Parameter()] = "start",
    limit: Annotated[int, Parameter(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Parameter(description="`next` of the previous page")] = None,
    minPosition: MinPosition = None,
) -> Response[bytes]:
    claims: Claims = request.state.claims
    errors = _listing_errors(
        {"clinicianId": clinicianId, "from": from_, "to": to, "sort": sort, "cursor": cursor}
    )
    own = await _own_clinician(source, claims)
    clinician: UUID | None = None
    if clinicianId == "me":
        if own is None:
            errors["clinicianId"] = "you are not linked to a clinician"
    elif clinicianId is not None and "clinicianId" not in errors:
        clinician = UUID(clinicianId)
    if errors:
        raise InvalidData(errors)
    decoded = model.decode_cursor(cursor) if cursor else None
    await _await_position(source, minPosition)
    query = model.AppointmentQuery(
        limit=limit,
        sort=sort,
        cursor=decoded,
        patient_id=patientId,
        clinician_id=own if clinicianId == "me" else clinician,
        start_from=from_,
        start_to=to,
        statuses=(status,) if status else (),
    )
    async with source.pool.connection() as conn:
        rows, following = await model.list_appointments(conn, query, source.tables)
    if disclosed := await _shown(rows, claims, own, source):
        await audit.disclosed(request, "appointment.list", disclosed)
    body = {
        "appointments": rows,
        "next": model.encode_cursor(following) if following else None,
    }
    return Response(_encoder.encode(body), media_type="application/json")


@get(
    "/appointments/{appointment_id:str}",
    summary="Get one appointment",
    tags=["appointments"],
    guards=[requires(SCHEDULE_READERS)],
    responses=answers(model.AppointmentRow, "The appointment"),
    opt={DOCS: _one("appointment", audited=True)},
)
async def get_appointment(
    appointment_id: FromPath[str],
    request: Request[Any, Any, Any],
    source: NamedDependency[Appointments],
    minPosition: MinPosition = None,
) -> Response[bytes]:
    try:
        aid = UUID(appointment_id)
    except ValueError:
        raise AppointmentNotFound(appointment_id) from None
    await _await_position(source, minPosition)
    async with source.pool.connection() as conn:
        row = await model.get_appointment(conn, aid, source.tables)
    if row is None:
        raise AppointmentNotFound(appointment_id)
    claims: Claims = request.state.claims
    if disclosed := await _shown([row], claims, await _own_clinician(source, claims), source):
        await audit.disclosed(request, "appointment.get", disclosed)
    return Response(
        _encoder.encode(row), media_type="application/json", headers={"ETag": f'"{row.version}"'}
    )


def _clinicians_after(cursor: str | None) -> tuple[str, UUID] | None:
    """The (name, id) a clinicians page starts after; InvalidData for a foreign cursor."""
    if not cursor:
        return None
    try:
        key, _, raw_id = cursor.rpartition("~")
        return key, UUID(raw_id)
    except ValueError:
        raise InvalidData({"cursor": "is not a cursor of this listing"}) from None


@get(
    "/clinicians",
    summary="List clinicians",
    tags=["clinicians"],
    guards=[requires(SCHEDULE_READERS)],
    responses=answers(CliniciansPage, "A page of clinicians"),
    opt={QUERY_RULES: lambda values: _clinicians_after(values.get("cursor"))},
)
async def list_clinicians(
    source: NamedDependency[Appointments],
    limit: Annotated[int, Parameter(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Parameter(description="`next` of the previous page")] = None,
    minPosition: MinPosition = None,
) -> Response[bytes]:
    after = _clinicians_after(cursor)
    await _await_position(source, minPosition)
    async with source.pool.connection() as conn:
        rows = await model.list_clinicians(conn, limit + 1, after, source.tables)
    following = None
    if len(rows) > limit:
        rows = rows[:limit]
        following = f"{rows[-1].name.lower()}~{rows[-1].id}"
    return Response(
        _encoder.encode({"clinicians": rows, "next": following}), media_type="application/json"
    )


@get(
    "/clinicians/{clinician_id:str}",
    summary="Get one clinician, with time off",
    tags=["clinicians"],
    guards=[requires(SCHEDULE_READERS)],
    responses=answers(model.ClinicianRow, "The clinician"),
    opt={DOCS: _one("clinician")},
)
async def get_clinician(
    clinician_id: FromPath[str],
    source: NamedDependency[Appointments],
    minPosition: MinPosition = None,
) -> Response[bytes]:
    row = await _clinician(source, clinician_id, minPosition)
    return Response(
        _encoder.encode(row), media_type="application/json", headers={"ETag": f'"{row.version}"'}
    )


async def _clinician(
    source: Appointments, clinician_id: str, position: int | None
) -> model.ClinicianRow:
    try:
        cid = UUID(clinician_id)
    except ValueError:
        raise ClinicianNotFound(clinician_id) from None
    await _await_position(source, position)
    async with source.pool.connection() as conn:
        row = await model.get_clinician(conn, cid, source.tables)
    if row is None:
        raise ClinicianNotFound(clinician_id)
    return row


@get(
    "/clinicians/{clinician_id:str}/slots",
    summary="Free slots on a day",
    description="Slots of `durationMinutes` within working hours on the clinician's local "
    "`date`, minus booked time and time off; past slots are left out.",
    tags=["clinicians"],
    guards=[requires(SCHEDULE_READERS)],
    responses=answers(Slots, "The free slots, in order"),
    opt={DOCS: Documented(problems={404: "No such clinician (or the id is not a UUID)"})},
)
async def free_slots(
    clinician_id: FromPath[str],
    source: NamedDependency[Appointments],
    date_: Annotated[date, Parameter(query="date", description="YYYY-MM-DD, local")],
    durationMinutes: Annotated[
        int, Parameter(ge=DURATION_MIN, le=DURATION_MAX, multiple_of=DURATION_STEP)
    ] = 30,
    minPosition: MinPosition = None,
) -> Response[bytes]:
    clinician = await _clinician(source, clinician_id, minPosition)
    day_start, day_end = local_day_utc(clinician.timezone, date_)
    async with source.pool.connection() as conn:
        busy = await model.busy_between(conn, clinician.id, day_start, day_end, source.tables)
    now = datetime.now(UTC)
    slots = [
        {"start": start, "end": end}
        for start, end in free_slots_in(
            clinician.timezone,
            WorkingHours.from_wire(clinician.working_hours),
            [(t.start, t.end) for t in clinician.time_off],
            date_,
            durationMinutes,
            busy,
        )
        if start > now
    ]
    return Response(_encoder.encode({"slots": slots}), media_type="application/json")


ROUTES = [list_appointments, get_appointment, list_clinicians, get_clinician, free_slots]

PROBLEMS: Problems = {
    AppointmentNotFound: lambda exc: problem(404, "no such appointment"),
    ClinicianNotFound: lambda exc: problem(404, "no such clinician"),
}
