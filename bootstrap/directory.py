"""The directory projection process: a FastStream consumer group on `patient.events`."""

from __future__ import annotations

import asyncio
import signal
import time

import structlog
from redis.asyncio import Redis

from domain import contracts
from projections.directory import DirectoryProjection
from projections.worker import GROUP, DirectoryWorker
from readmodels.directory import LIVE, DirectoryCache, Tables
from runtime.consumers import subscribe
from runtime.db import open_pool
from runtime.http import serve_health
from runtime.kafka import ensure_topics, kafka_broker, wait_for_kafka
from runtime.settings import Settings

log = structlog.get_logger(__name__)


async def run(settings: Settings, tables: Tables = LIVE) -> None:
    """Runs the directory projection until SIGTERM or SIGINT."""
    topic = settings.topic(contracts.PATIENT_STREAM)
    # The topic prefix keeps test runs out of the live stack's consumer group.
    group = f"{settings.topic_prefix}{GROUP}"
    dlq = f"{topic}.dlq.{GROUP}"
    await wait_for_kafka(settings.kafka_bootstrap)
    await ensure_topics(settings.kafka_bootstrap, [topic])
    await ensure_topics(settings.kafka_bootstrap, [dlq], partitions=1)
    pool = await open_pool(settings.database_url, min_size=1, max_size=4)
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
