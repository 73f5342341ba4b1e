"""The patient directory's Redis cache, written by the projection and read by the query API.

Single patients are cached as `<version>|<json>` (an empty json is a tombstone for
a removed patient) and only ever replaced by a newer version, so a reader that
fills the cache from an older database read can never overwrite the projection's
newer write. Pages are cached under the directory's generation, which the
projection bumps after every change: an old page is simply never looked up again.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

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
