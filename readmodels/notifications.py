"""The notification ledger, as the query API reads it (the notifier writes it).

Rows hold ids, purposes, states and times: never an address or a message's text.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from psycopg.rows import class_row

STATUSES = ("pending", "sending", "sent", "failed-retrying", "given-up")


class NotificationRow(msgspec.Struct, rename="camel", kw_only=True):
    id: UUID
    patient_id: UUID
    purpose: str
    status: str
    attempts: int
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None


async def list_notifications(
    conn: psycopg.AsyncConnection[Any],
    patient_id: UUID | None,
    status: str | None,
    limit: int,
    before: tuple[datetime, UUID] | None,
) -> list[NotificationRow]:
    """Newest first (then id), optionally one patient's or one status, before a cursor."""
    where: list[str] = ["true"]
    params: list[Any] = []
    if patient_id is not None:
        where.append("patient_id = %s")
        params.append(patient_id)
    if status is not None:
        where.append("status = %s")
        params.append(status)
    if before is not None:
        where.append("(created_at, id) < (%s, %s)")
        params += list(before)
    async with conn.cursor(row_factory=class_row(NotificationRow)) as cur:
        await cur.execute(
            "SELECT id, patient_id, purpose, status, attempts, last_error, created_at, sent_at"
            f" FROM notifications WHERE {' AND '.join(where)}"
            " ORDER BY created_at DESC, id DESC LIMIT %s",
            [*params, limit],
        )
        return await cur.fetchall()
