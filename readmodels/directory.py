"""The patient directory's contract: its tables, its row, its cache entries.

The directory projection writes through this module and the query API reads
through it; neither imports the other. Each row keeps the aggregate version and
global position it reflects. `positions` records every global position the
projection has applied, so a reader can wait for its own write (read-your-writes)
by asking the read model alone.

The Redis cache holds single patients as `<version>|<json>` (an empty json is a
tombstone for a removed patient, ERASED_ENTRY one for an erased patient), only ever
replaced by a newer version, so a reader that fills the cache from an older database
read can never overwrite the projection's newer write. Pages are cached under the
directory's generation, which the projection bumps after every change: an old page is
never looked up again (and after an erasure every page is deleted).
A cache that was out of reach may have missed write-throughs, so whoever finds it
back forgets it (`forget_cached`) before reading from it again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from psycopg import sql
from psycopg.rows import class_row
from redis.asyncio import Redis

NAME = "directory"

ERASED_ENTRY = b"erased"
"""The cache entry (and `cache_entry()`) of an erased patient: the query API answers 410."""


class PatientRow(msgspec.Struct, rename="camel", kw_only=True):
    """One patient as the query API shows it."""

    id: UUID
    name: str
    email: str
    address: str
    date_of_birth: date
    registered_date: date
    version: int


class DirectoryRecord(PatientRow, kw_only=True):
    """One row of the patients table, as selected by `COLUMNS`."""

    removed: bool
    name_key: str
    erased: bool = False
    """An erased patient's row keeps no personal data (blank fields, no date of birth)."""

    def patient(self) -> PatientRow:
        return PatientRow(**{f: getattr(self, f) for f in PatientRow.__struct_fields__})

    def cache_entry(self) -> bytes:
        """What the cache holds for this row: the patient's JSON, b"" if removed, or
        ERASED_ENTRY if erased."""
        if self.erased:
            return ERASED_ENTRY
        return b"" if self.removed else _encoder.encode(self.patient())


COLUMNS = sql.SQL(", ").join(sql.Identifier(f) for f in DirectoryRecord.__struct_fields__)
"""The columns of a `DirectoryRecord`, in order."""

records = class_row(DirectoryRecord)
"""A psycopg row factory: `conn.cursor(row_factory=records)` yields DirectoryRecords."""

_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class Tables:
    """Table names, so a replay can build a fresh copy beside the live one."""

    patients: str = "directory_patients"
    tracking: str = "projection_tracking"
    positions: str = "directory_positions"
    history: str = "patient_history"
    """Each patient's events: who changed which fields, when (`readmodels.history`)."""


LIVE = Tables()
"""The tables the query API reads."""


async def create_copy(conn: psycopg.AsyncConnection[Any], tables: Tables) -> None:
    """Creates `tables` empty, shaped like the live ones (columns, defaults, indexes).

    The live tables come from the migrations (`carelog db migrate`); a copy is what a
    rebuild fills beside them, and what a test projects into on its own.
    """
    async with conn.transaction():
        for copy, live in (
            (tables.patients, LIVE.patients),
            (tables.tracking, LIVE.tracking),
            (tables.positions, LIVE.positions),
            (tables.history, LIVE.history),
        ):
            await conn.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} (LIKE {} INCLUDING ALL)").format(
                    sql.Identifier(copy), sql.Identifier(live)
                )
            )


async def get_record(
    conn: psycopg.AsyncConnection[Any], patient_id: UUID, tables: Tables = LIVE
) -> DirectoryRecord | None:
    """The patient's row (removed ones too), or None if the directory never saw it."""
    async with conn.cursor(row_factory=records) as cur:
        await cur.execute(
            sql.SQL("SELECT {} FROM {} WHERE id = %s").format(
                COLUMNS, sql.Identifier(tables.patients)
            ),
            [patient_id],
        )
        return await cur.fetchone()


async def get_records(
    conn: psycopg.AsyncConnection[Any], patient_ids: Sequence[UUID], tables: Tables = LIVE
) -> dict[UUID, DirectoryRecord]:
    """`get_record` for many patients in one query: the ones the directory has seen."""
    async with conn.cursor(row_factory=records) as cur:
        await cur.execute(
            sql.SQL("SELECT {} FROM {} WHERE id = ANY(%s)").format(
                COLUMNS, sql.Identifier(tables.patients)
            ),
            [list(patient_ids)],
        )
        return {record.id: record for record in await cur.fetchall()}


_SET_IF_NEWER = """
local current = redis.call('GET', KEYS[1])
if current then
  local version = tonumber(string.match(current, '^(%d+)|'))
  if version and version >= tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[2], 'EX', tonumber(ARGV[3]))
return 1
"""


_PAGE = """
local generation = redis.call('GET', KEYS[1]) or '0'
return {generation, redis.call('GET', ARGV[1] .. generation .. ':' .. ARGV[2])}
"""


class DirectoryCache:
    """Key layout and the version-guarded writes of the directory cache."""

    def __init__(self, redis: Redis, prefix: str = "carelog:", ttl_seconds: int = 60):
        self.redis = redis
        self.prefix = f"{prefix}directory"
        self.ttl = ttl_seconds
        self._set_if_newer = redis.register_script(_SET_IF_NEWER)
        self._page = redis.register_script(_PAGE)

    def patient_key(self, patient_id: str) -> str:
        return f"{self.prefix}:patient:{patient_id}"

    @property
    def generation_key(self) -> str:
        return f"{self.prefix}:generation"

    def page_key(self, generation: int, query: str) -> str:
        return f"{self.prefix}:page:{generation}:{query}"

    async def put_patient(self, patient_id: str, version: int, body: bytes) -> None:
        """Caches a patient's JSON (b"" for removed) unless a newer version is there."""
        await self._set_if_newer(
            keys=[self.patient_key(patient_id)], args=[version, body, self.ttl]
        )

    async def get_patient(self, patient_id: str) -> tuple[int, bytes] | None:
        raw = await self.redis.get(self.patient_key(patient_id))
        if raw is None:
            return None
        version, _, body = (raw if isinstance(raw, bytes) else raw.encode()).partition(b"|")
        return int(version), body

    async def changed(self, patients: list[tuple[str, int, bytes]]) -> None:
        """After a committed change: write the patients through and retire cached pages."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for patient_id, version, body in patients:
                await self._set_if_newer(
                    keys=[self.patient_key(patient_id)],
                    args=[version, body, self.ttl],
                    client=pipe,
                )
            pipe.incr(self.generation_key)
            await pipe.execute()

    async def forget_pages(self, batch: int = 500) -> int:
        """Deletes every cached page (after an erasure: an older page may show the patient)."""
        removed = 0
        keys: list[Any] = []
        async for key in self.redis.scan_iter(match=f"{self.prefix}:page:*", count=batch):
            keys.append(key)
            if len(keys) >= batch:
                removed += int(await self.redis.delete(*keys))
                keys = []
        if keys:
            removed += int(await self.redis.delete(*keys))
        return removed

    async def generation(self) -> int:
        value: Any = await self.redis.get(self.generation_key)
        return int(value or 0)

    async def get_page(self, query: str) -> tuple[int, bytes | None]:
        """The current generation and the page cached under it, in one round trip."""
        generation, body = await self._page(
            keys=[self.generation_key], args=[f"{self.prefix}:page:", query]
        )
        return int(generation), None if body is None else bytes(body)

    async def put_page(self, generation: int, query: str, body: bytes) -> None:
        await self.redis.set(self.page_key(generation, query), body, ex=min(self.ttl, 30))


async def forget_cached(cache: DirectoryCache, batch: int = 500) -> int:
    """Drops every cached patient and retires every cached page: after a swap of tables,
    or before trusting again a cache that was out of reach while the directory moved on
    (the projection's write-through of those changes may never have arrived)."""
    removed = 0
    keys: list[Any] = []
    async for key in cache.redis.scan_iter(match=cache.patient_key("*"), count=batch):
        keys.append(key)
        if len(keys) >= batch:
            removed += int(await cache.redis.delete(*keys))
            keys = []
    if keys:
        removed += int(await cache.redis.delete(*keys))
    await cache.redis.incr(cache.generation_key)
    return removed
