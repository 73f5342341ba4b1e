"""`GET /audit` (admin): the disclosure audit, newest first, a page at a time.

The records name who was shown which patients and when, never the data shown; reading
them is not itself recorded (docs/auth.md, "Audit").
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

import msgspec
import psycopg_pool
from litestar import Request, Response, get
from litestar.di import NamedDependency
from litestar.params import Parameter

from domain.errors import InvalidData
from domain.roles import AUDIT_READERS
from read_api.queries import window_errors
from runtime import audit
from runtime.http import QUERY_RULES, answers
from runtime.security import requires

_encoder = msgspec.json.Encoder()


class AuditPage(msgspec.Struct, kw_only=True):
    records: list[audit.Record]
    next: Annotated[
        str | None, msgspec.Meta(description="Pass as `cursor` for the next page; null at the end")
    ]


def _rules(values: Mapping[str, Any]) -> int | None:
    """The record a page starts before; InvalidData naming each parameter that breaks a
    rule beyond its type (values typed, wire names)."""
    errors = window_errors(values)
    cursor = values.get("cursor")
    before = audit.decode_cursor(cursor) if cursor else None
    if cursor and before is None:
        errors["cursor"] = "is not a cursor of this listing; start again without it"
    if errors:
        raise InvalidData(errors)
    return before


@get(
    "/audit",
    summary="The disclosure audit, newest first",
    description="Who was shown which patients' personal data, when, and in which request.",
    tags=["audit"],
    guards=[requires(AUDIT_READERS)],
    responses=answers(AuditPage, "A page of disclosures"),
    opt={QUERY_RULES: _rules},
)
async def list_disclosures(
    request: Request[Any, Any, Any],
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
    before = _rules({"from": from_, "to": to, "cursor": cursor})
    query = audit.AuditQuery(patientId, actorId, from_, to, limit, before)
    writer: audit.Writer | None = request.app.state.get(audit.STATE_KEY)
    if writer is not None:
        await writer.flush()  # what was read here a moment ago is in the table
    async with pool.connection() as conn:
        records, more = await audit.page(conn, query)
    following = audit.encode_cursor(records[-1].id) if more and records else None
    return Response(
        _encoder.encode({"records": records, "next": following}), media_type="application/json"
    )


ROUTES = [list_disclosures]
