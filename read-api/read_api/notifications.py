"""The query API's view of the notification ledger (admin): what was owed, sent or given up."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import msgspec
import psycopg_pool
from litestar import Response, get
from litestar.di import NamedDependency
from litestar.params import Parameter

from domain.errors import InvalidData
from domain.roles import NOTIFICATION_READERS
from readmodels import notifications as ledger
from runtime.http import QUERY_RULES, answers
from runtime.security import requires

_encoder = msgspec.json.Encoder()
Status = Literal["pending", "sending", "sent", "failed-retrying", "given-up"]


class _Cursor(msgspec.Struct, array_like=True):
    created_at: datetime
    id: UUID


class NotificationsPage(msgspec.Struct, kw_only=True):
    notifications: list[ledger.NotificationRow]
    next: str | None


def _before(cursor: str | None) -> tuple[datetime, UUID] | None:
    """The row a page starts before; InvalidData for a cursor this listing did not give."""
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        decoded = msgspec.json.decode(raw, type=_Cursor)
    except (ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise InvalidData({"cursor": "is not a cursor of this listing"}) from None
    return decoded.created_at, decoded.id


@get(
    "/notifications",
    summary="The notification ledger, newest first",
    tags=["notifications"],
    guards=[requires(NOTIFICATION_READERS)],
    responses=answers(NotificationsPage, "A page of the ledger"),
    opt={QUERY_RULES: lambda values: _before(values.get("cursor"))},
)
async def list_notifications(
    pool: NamedDependency[psycopg_pool.AsyncConnectionPool[Any]],
    patientId: Annotated[UUID | None, Parameter(description="Only this patient's")] = None,
    status: Annotated[Status | None, Parameter(description="Only this state")] = None,
    limit: Annotated[int, Parameter(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Parameter(description="`next` of the previous page")] = None,
) -> Response[bytes]:
    before = _before(cursor)
    async with pool.connection() as conn:
        rows = await ledger.list_notifications(conn, patientId, status, limit + 1, before)
    following = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = _Cursor(rows[-1].created_at, rows[-1].id)
        following = base64.urlsafe_b64encode(msgspec.json.encode(last)).decode().rstrip("=")
    return Response(
        _encoder.encode({"notifications": rows, "next": following}), media_type="application/json"
    )


ROUTES = [list_notifications]
