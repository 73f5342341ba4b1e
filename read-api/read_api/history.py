"""The query API's patient history: who changed what and when (`readmodels.history`).

Admins and clinicians may read it (`domain.roles.HISTORY_READERS`). Every entry names
the fields its event set or changed; only `HISTORY_VALUE_READERS` (admins) also get the
new values, and no one gets the old ones (docs/auth.md, "Patient history"). A patient
the directory has never seen is 404; a removed patient's history stays readable.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

import msgspec
import psycopg_pool
from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.params import FromPath, Parameter

from domain.errors import InvalidData, PatientNotFound
from domain.roles import HISTORY_READERS, HISTORY_VALUE_READERS
from readmodels import history
from readmodels.directory import get_record
from runtime import audit
from runtime.http import DOCS, QUERY_RULES, Documented, answers
from runtime.security import Claims, requires

_encoder = msgspec.json.Encoder()


class HistoryActor(msgspec.Struct, rename="camel", kw_only=True):
    user_id: Annotated[
        str, msgspec.Meta(description="The user's id, or `system:<process>` for carelog itself")
    ]
    role: str


class HistoryEntry(msgspec.Struct, rename="camel", kw_only=True):
    """One event of the patient's history."""

    version: int
    position: Annotated[int, msgspec.Meta(description="The event's position in the global log")]
    type: Annotated[str, msgspec.Meta(examples=["PatientDetailsChanged"])]
    occurred_at: datetime
    actor: Annotated[
        HistoryActor | None,
        msgspec.Meta(description="Who caused it; null for events stored before actors were"),
    ]
    correlation_id: str | None
    fields: Annotated[
        list[str], msgspec.Meta(description="The names of the fields the event set or changed")
    ]
    values: Annotated[
        dict[str, Any] | None,
        msgspec.Meta(description="Those fields' new values, for admins only; null otherwise"),
    ]


class HistoryPage(msgspec.Struct, rename="camel", kw_only=True):
    """One page of a patient's history, oldest first."""

    patient_id: UUID
    entries: list[HistoryEntry]
    next: Annotated[
        str | None, msgspec.Meta(description="Pass as `cursor` for the next page; null at the end")
    ]


async def history_of(
    pool: psycopg_pool.AsyncConnectionPool[Any], patient_id: UUID, after: int, limit: int
) -> list[history.Entry]:
    """The patient's entries after version `after` (up to `limit`); PatientNotFound if the
    directory has never seen the patient."""
    async with pool.connection() as conn:
        if await get_record(conn, patient_id) is None:
            raise PatientNotFound(str(patient_id))
        return await history.page(conn, patient_id, after, limit)


def _after(cursor: str | None) -> int:
    if cursor is None:
        return 0
    if not cursor.isascii() or not cursor.isdigit() or len(cursor) > 18:
        raise InvalidData({"cursor": "is not a cursor of this history"})
    return int(cursor)


def _shown(entry: history.Entry, values: bool) -> HistoryEntry:
    actor = None
    if entry.actor_id is not None:
        actor = HistoryActor(user_id=entry.actor_id, role=entry.actor_role or "")
    return HistoryEntry(
        version=entry.version,
        position=entry.position,
        type=entry.type,
        occurred_at=entry.occurred_at,
        actor=actor,
        correlation_id=entry.correlation_id,
        fields=entry.fields,
        values=entry.values if values else None,
    )


@get(
    "/patients/{patient_id:str}/history",
    summary="A patient's history: who changed which fields, and when",
    description="Oldest first. Field names for admins and clinicians; new values for admins"
    " only; old values for no one.",
    tags=["patients"],
    guards=[requires(HISTORY_READERS)],
    responses=answers(HistoryPage, "A page of the patient's history"),
    opt={
        DOCS: Documented(
            problems={404: "No such patient (or the id is not a UUID)", **audit.UNAUDITED}
        ),
        QUERY_RULES: lambda values: _after(values.get("cursor")),
    },
)
async def patient_history(
    patient_id: FromPath[str],
    request: Request[Any, Any, Any],
    pool: NamedDependency[psycopg_pool.AsyncConnectionPool[Any]],
    limit: Annotated[int, Parameter(ge=1, le=200, description="Page size")] = 50,
    cursor: Annotated[
        str | None, Parameter(description="The `next` value of the previous page")
    ] = None,
) -> Response[bytes]:
    try:
        pid = UUID(patient_id)
    except ValueError:
        raise PatientNotFound(patient_id) from None
    after = _after(cursor)
    claims: Claims = request.state.claims
    entries = await history_of(pool, pid, after, limit + 1)
    following = str(entries[limit - 1].version) if len(entries) > limit else None
    values = claims.role in HISTORY_VALUE_READERS
    if entries:
        await audit.disclosed(request, "patient.history", [pid])
    page = HistoryPage(
        patient_id=pid,
        entries=[_shown(e, values) for e in entries[:limit]],
        next=following,
    )
    return Response(_encoder.encode(page), media_type="application/json")


ROUTES = [patient_history]
