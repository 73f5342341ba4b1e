"""`GET /audit` (admin): the disclosure audit, newest first, a page at a time.

The records name who was shown which patients and when, never the data shown; reading
them is not itself recorded (docs/auth.md, "Audit").
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

import msgspec
import psycopg_pool
from litestar import Response, get
from litestar.di import NamedDependency
from litestar.params import Parameter

from domain.errors import InvalidData
from domain.roles import AUDIT_READERS
from runtime import audit
from runtime.http import answers
from runtime.security import requires

_encoder = msgspec.json.Encoder()


class AuditPage(msgspec.Struct, kw_only=True):
    records: list[audit.Record]
    next: Annotated[
        str | None, msgspec.Meta(description="Pass as `cursor` for the next page; null at the end")
    ]


@get(
    "/audit",
    summary="The disclosure audit, newest first",
    description="Who was shown which patients' personal data, when, and in which request.",
    tags=["audit"],
    guards=[requires(AUDIT_READERS)],
    responses=answers(AuditPage, "A page of disclosures"),
)
async def list_disclosures(
    pool: NamedDependency[psycopg_pool.AsyncConnectionPool[Any]],
    patientId: Annotated[UUID | None, Parameter(description="Only this patient's")] = None,
    actorId: Annotated[
        str | None, Parameter(min_length=1, max_length=100, description="Only this user's")
    ] = None,
    from_: Annotated[
        datetime | None, Parameter(query="from", description="At or after (RFC 3339)")
    ] = None,
    to: Annotated[datetime | None, Parameter(description="Before (RFC 3339)")] = None,
    limit: Annotated[int, Parameter(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Parameter(description="`next` of the previous page")] = None,
) -> Response[bytes]:
    errors: dict[str, str] = {}
    for name, moment in (("from", from_), ("to", to)):
        if moment is not None and moment.tzinfo is None:
            errors[name] = "must include a UTC offset"
    if from_ and to and from_.tzinfo and to.tzinfo and to <= from_:
        errors["to"] = "must be after from"
    before = audit.decode_cursor(cursor) if cursor else None
    if cursor and before is None:
        errors["cursor"] = "is not a cursor of this listing; start again without it"
    if errors:
        raise InvalidData(errors)
    query = audit.AuditQuery(patientId, actorId, from_, to, limit, before)
    async with pool.connection() as conn:
        records, more = await audit.page(conn, query)
    following = audit.encode_cursor(records[-1].id) if more and records else None
    return Response(
        _encoder.encode({"records": records, "next": following}), media_type="application/json"
    )


ROUTES = [list_disclosures]
