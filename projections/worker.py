"""The directory projection's process: a FastStream consumer group on `patient.events`."""

from __future__ import annotations

import asyncio
import signal
import time
from datetime import UTC, datetime
from typing import Any

import structlog
from faststream.kafka import KafkaBroker
from prometheus_client import Counter, Gauge
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from domain import contracts
from projections.directory import LIVE, DirectoryProjection, Tables, create_tables
from readmodels.cache import DirectoryCache
from runtime.consumers import Batch, EventBatchWorker, subscribe
from runtime.db import open_pool
from runtime.http import serve_health
from runtime.kafka import ensure_topics, kafka_broker, wait_for_kafka
from runtime.settings import Settings

log = structlog.get_logger(__name__)

EVENTS = Counter(
    "carelog_projection_events_total", "Events handled by a projection", ["projection", "outcome"]
)
POSITION = Gauge("carelog_projection_position", "Highest global position applied", ["projection"])
LAG = Gauge(
    "carelog_projection_lag_seconds",
    "Time from an event's occurrence to its application, for the latest batch",
    ["projection"],
)

GROUP = "carelog-directory"


class DirectoryWorker(EventBatchWorker):
    """Applies a batch to the directory, then refreshes the cache."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        cache: DirectoryCache,
        broker: KafkaBroker,
        dead_letter_topic: str,
        projection: DirectoryProjection | None = None,
    ):
        self.projection = projection or DirectoryProjection()
        super().__init__(self.projection.name, broker, dead_letter_topic)
        self.pool = pool
        self.cache = cache

    async def apply(self, batch: Batch) -> None:
        async with self.pool.connection() as conn:
            outcome = await self.projection.apply(conn, batch)
        await self.cache.changed(outcome.changed)
        EVENTS.labels(self.name, "applied").inc(outcome.applied)
        EVENTS.labels(self.name, "duplicate").inc(outcome.duplicates)
        POSITION.labels(self.name).set(outcome.position)
        newest = max(envelope.occurred_at for envelope, _ in batch)
        LAG.labels(self.name).set(max(0.0, (datetime.now(UTC) - newest).total_seconds()))


async def run_directory(settings: Settings, tables: Tables = LIVE) -> None:
    """Runs the directory projection until SIGTERM or SIGINT."""
    topic = settings.topic(contracts.PATIENT_STREAM)
    # The topic prefix keeps test runs out of the live stack's consumer group.
    group = f"{settings.topic_prefix}{GROUP}"
    dlq = f"{topic}.dlq.{GROUP}"
    await wait_for_kafka(settings.kafka_bootstrap)
    await ensure_topics(settings.kafka_bootstrap, [topic])
    await ensure_topics(settings.kafka_bootstrap, [dlq], partitions=1)
    pool = await open_pool(settings.database_url, min_size=1, max_size=4)
    async with pool.connection() as conn:
        await create_tables(conn, tables)
    redis_client = Redis.from_url(settings.redis_url)
    cache = DirectoryCache(
        redis_client, prefix=settings.cache_prefix, ttl_seconds=settings.cache_ttl_seconds
    )
    broker = kafka_broker(settings, group)
    worker = DirectoryWorker(pool, cache, broker, dlq, DirectoryProjection(tables))
    subscribe(broker, topic, worker, group)

    async def database() -> None:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")

    async def cache_check() -> None:
        await redis_client.ping()

    async def kafka() -> None:
        if not await broker.ping(timeout=2.0):
            raise ConnectionError("broker does not answer")

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await broker.start()
    server = await serve_health(
        {"database": database, "cache": cache_check, "kafka": kafka},
        settings.http_host,
        settings.ports["projection"],
    )
    log.info("directory projection started", topic=topic, group=group)
    started = time.monotonic()
    await stopping.wait()
    log.info("directory projection stopping", uptime=round(time.monotonic() - started, 1))
    await server.stop()
    await broker.stop()
    await redis_client.aclose()
    await pool.close()
