"""The directory cache as the query API uses it: a soft dependency behind a circuit breaker.

Redis only makes reads cheaper; PostgreSQL holds the whole directory. So a cache call
here answers or reports "not cached" (a miss, a write not made), and never raises a
Redis failure at a read: a failing cache costs a read its round trip to PostgreSQL,
not an error. Each call is bounded by short socket timeouts; after
`cache_breaker_failures` failed calls in a row the breaker opens and reads skip Redis
entirely, without waiting on it, for `cache_breaker_reset_seconds`. Then one call
probes it (half-open) while the others still skip it.

A cache that was out of reach may have missed the projection's write-throughs, and a
Redis that kept its data (or reloaded it from disk) may hold entries older than the
read model. So the probe first forgets the cached directory (`forget_cached`), and the
cache is trusted again only once that has succeeded.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from prometheus_client import Counter, Gauge
from purgatory import AsyncCircuitBreakerFactory, ContextChanged, Event
from purgatory.domain.model import CLOSED, OPENED, OpenedState
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from readmodels.directory import DirectoryCache, forget_cached
from runtime.cache import redis_for
from runtime.settings import Settings

log = structlog.get_logger(__name__)

T = TypeVar("T")

SKIPPED = Counter(
    "carelog_read_cache_skipped_total",
    "Query API cache calls not made or not answered",
    ["reason"],
)
OPEN = Gauge("carelog_read_cache_breaker_open", "1 while the query API skips its cache")

HEALTH_CHECK_SECONDS = 30
"""A pooled Redis connection idle this long is pinged before it is used again."""

_CIRCUIT = "directory-cache"


class CacheUnavailable(Exception):
    """The cache is being skipped (its breaker is open) or did not answer."""


def redis_client(settings: Settings) -> Redis:
    """A Redis client for a cache: short timeouts, and one immediate retry on a broken
    connection (a pooled one that a Redis restart closed), never on a timeout."""
    return redis_for(
        settings,
        socket_timeout=settings.redis_timeout_seconds,
        socket_connect_timeout=settings.redis_timeout_seconds,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        health_check_interval=HEALTH_CHECK_SECONDS,
    )


class GuardedCache:
    """The directory cache's reads and writes, each of which may be skipped."""

    def __init__(self, cache: DirectoryCache, failures: int, reset_seconds: float):
        self.cache = cache
        self._breakers = AsyncCircuitBreakerFactory(
            default_threshold=failures, default_ttl=reset_seconds
        )
        self._breakers.add_listener(self._changed)
        self._stale = False
        """Set when the breaker opens: the cache is not read again until it is forgotten."""
        self._probing = asyncio.Lock()
        self._reset_seconds = reset_seconds
        self._skip_until = 0.0
        """While the breaker is open: until when calls skip it without asking it."""

    def _changed(self, name: str, kind: str, event: Event) -> None:
        if kind != "state_changed" or not isinstance(event, ContextChanged):
            return
        if event.state == OPENED:
            self._stale = True
            self._skip_until = time.monotonic() + self._reset_seconds
            OPEN.set(1)
            log.warning("directory cache unreachable; reading from the database alone")
        elif event.state == CLOSED:
            OPEN.set(0)
            log.info("directory cache back in use")

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T | None:
        """The operation's result, or None if the cache was skipped or failed."""
        if time.monotonic() < self._skip_until:
            # Open, and not yet time to probe: skipped without entering the breaker, whose
            # refusal is an exception raised (and its traceback built) per call.
            SKIPPED.labels("open").inc()
            return None
        breaker = await self._breakers.get_breaker(_CIRCUIT)
        if breaker.context.state == CLOSED and not self._stale:
            return await self._attempt(breaker, operation)
        if self._probing.locked():
            SKIPPED.labels("open").inc()
            return None
        async with self._probing:
            return await self._attempt(breaker, operation)

    async def _attempt(self, breaker: Any, operation: Callable[[], Awaitable[T]]) -> T | None:
        try:
            async with breaker:
                if self._stale:
                    removed = await forget_cached(self.cache)
                    self._stale = False
                    log.info("directory cache forgotten before its reuse", removed=removed)
                return await operation()
        except OpenedState as exc:
            # The breaker raises the same exception object every time: without this, each
            # raise would add its frames to that object's traceback, which then holds
            # every frame it ever passed through (a growing heap, and ever longer pauses
            # to collect it).
            exc.__traceback__ = None
            SKIPPED.labels("open").inc()
        except (RedisError, OSError) as exc:
            SKIPPED.labels(type(exc).__name__).inc()
        return None

    async def get_patient(self, patient_id: str) -> tuple[int, bytes] | None:
        return await self._call(lambda: self.cache.get_patient(patient_id))

    async def put_patient(self, patient_id: str, version: int, body: bytes) -> None:
        await self._call(lambda: self.cache.put_patient(patient_id, version, body))

    async def get_page(self, query: str) -> tuple[int | None, bytes | None]:
        """The generation and the page cached under it; (None, None) if the cache was skipped."""
        found = await self._call(lambda: self.cache.get_page(query))
        return found if found is not None else (None, None)

    async def put_page(self, generation: int, query: str, body: bytes) -> None:
        await self._call(lambda: self.cache.put_page(generation, query, body))

    async def check(self) -> None:
        """Readiness: returns when the cache is in use and answers, raises otherwise."""

        async def ping() -> bool:
            return bool(await self.cache.redis.ping())

        if not await self._call(ping):
            raise CacheUnavailable("the directory cache is being skipped")
