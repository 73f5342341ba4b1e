"""Idempotent creates: the `Idempotency-Key` header of POST /patients and POST /appointments.

A client that sends a create, loses the answer and sends it again must not make the
patient (or booking) twice. With an `Idempotency-Key`, the first request writes a row
(operation, acting user, key) holding a hash of its body and the id the new resource
will have, and commits it before the command runs. The command then creates the
aggregate under that id. A retry finds the row, so the same id: if the aggregate is
already in the store (the first request committed, whatever happened to its answer,
even a crash of the process), the command answers from it instead of creating another;
if not (the first request failed or died before its commit), it creates it now. Two
requests racing with one key get one id, so one of them wins the store's version
check and the other answers from what the winner saved.

The same key with another body is 422. Keys expire after `TTL` (24 hours): an expired
row is ignored and replaced on its key's next use, and expired rows are deleted now and
then. The rows hold no personal data: a hash of the body, an id, the user's id.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

from commands.store import EventStore
from domain.errors import InvalidData

HEADER = "Idempotency-Key"
KEY_MAX = 255
KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"
"""Printable ASCII without spaces, 1 to 255 characters (a UUID is the usual choice)."""
_KEY = re.compile(KEY_PATTERN)
STATE_KEY = "idempotency"
"""Where the command API keeps its `IdempotencyKeys`: `app.state.idempotency`."""
TTL = timedelta(hours=24)
"""How long a key stands for the resource it created."""
CLEANUP_SECONDS = 600.0
"""Least time between two deletions of expired rows by one process."""

REGISTER_PATIENT = "register-patient"
BOOK_APPOINTMENT = "book-appointment"


class KeyReused(Exception):
    """The key came before with another request body."""


def key_of(headers: Any) -> str | None:
    """The request's idempotency key, None without one; InvalidData for an unusable one."""
    raw = headers.get(HEADER.lower())
    if raw is None:
        return None
    if not _KEY.match(raw):
        raise InvalidData(
            {HEADER: f"must be 1 to {KEY_MAX} printable ASCII characters without spaces"}
        )
    return str(raw)


def body_hash(canonical: bytes) -> bytes:
    """What a request is compared by: SHA-256 of its body in canonical form."""
    return hashlib.sha256(canonical).digest()


class IdempotencyKeys:
    """The keys table, on the event store's database (its connection pool)."""

    def __init__(self, store: EventStore, ttl: timedelta = TTL):
        self.store = store
        self.ttl = ttl
        self._cleaned = 0.0
        self._lock = threading.Lock()

    def reserve(self, operation: str, actor: str, key: str, request_hash: bytes) -> UUID:
        """The id of the resource `key` stands for: a new one on the key's first use (or
        after it expired), the one it got before otherwise. KeyReused if it came with
        another body. Committed before it returns."""
        datastore = self.store.recorder.datastore  # type: ignore[attr-defined]
        ttl = f"{int(self.ttl.total_seconds())} seconds"
        args = [operation, actor, key]
        with datastore.transaction(commit=True) as cursor:
            cursor.execute(
                "INSERT INTO idempotency_keys AS k"
                " (operation, actor, key, request_hash, resource_id, created_at)"
                " VALUES (%s, %s, %s, %s, %s, now())"
                " ON CONFLICT (operation, actor, key) DO UPDATE"
                " SET request_hash = EXCLUDED.request_hash, resource_id = EXCLUDED.resource_id,"
                " created_at = EXCLUDED.created_at"
                " WHERE k.created_at <= now() - %s::interval"
                " RETURNING resource_id, request_hash",
                [*args, request_hash, uuid4(), ttl],
            )
            row = cursor.fetchone()
            if row is None:  # a live row: this key's earlier request committed it
                cursor.execute(
                    "SELECT resource_id, request_hash FROM idempotency_keys"
                    " WHERE operation = %s AND actor = %s AND key = %s",
                    args,
                )
                row = cursor.fetchone()
            self._clean(cursor, ttl)
        assert row is not None  # the insert's conflict was with a committed row
        if bytes(row["request_hash"]) != request_hash:
            raise KeyReused(key)
        resource_id: UUID = row["resource_id"]
        return resource_id

    def _clean(self, cursor: Any, ttl: str) -> None:
        """Deletes expired rows, at most every CLEANUP_SECONDS (a write's own transaction)."""
        with self._lock:
            if time.monotonic() - self._cleaned < CLEANUP_SECONDS:
                return
            self._cleaned = time.monotonic()
        cursor.execute(
            "DELETE FROM idempotency_keys WHERE created_at <= now() - %s::interval", [ttl]
        )
