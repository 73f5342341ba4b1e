"""The projection processes: a FastStream consumer group per read model.

`carelog project directory` (health on 4011) keeps the patient directory from
`patient.events`; `carelog project appointments` (health on 4012) keeps the
appointments model from `appointment.events`; `carelog project analytics` (health on
4014) keeps the analytics facts from the patient, appointment and billing streams;
`carelog react patient-removals`
(health on 4013) cancels removed patients' future appointments.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import structlog
from faststream.kafka import KafkaBroker
from psycopg_pool import AsyncConnectionPool

from commands.reactions import GROUP as REMOVALS_GROUP
from commands.reactions import PatientRemovals
from commands.scheduling import SchedulingService
from commands.store import EventStore
from domain import contracts
from domain.billing import BILLING_STREAM
from projections.analytics import GROUP as ANALYTICS_GROUP
from projections.analytics import AnalyticsWorker
from projections.appointments import GROUP as APPOINTMENTS_GROUP
from projections.appointments import AppointmentsWorker
from projections.directory import DirectoryProjection
from projections.worker import GROUP, DirectoryWorker
from readmodels.directory import LIVE, DirectoryCache, Tables
from runtime.cache import redis_for
from runtime.consumers import EventBatchWorker, subscribe
from runtime.crypto import Keyring
from runtime.db import open_pool
from runtime.http import Check, broker_check, database_check, serve_health, settle_heap
from runtime.kafka import ensure_topics, kafka_broker, wait_for_kafka
from runtime.settings import Settings

log = structlog.get_logger(__name__)

Build = Callable[[AsyncConnectionPool[Any], KafkaBroker, str], Awaitable[EventBatchWorker]]


async def run(settings: Settings, tables: Tables = LIVE) -> None:
    """Runs the directory projection until SIGTERM or SIGINT."""
    redis_client = redis_for(settings)
    cache = DirectoryCache(
        redis_client, prefix=settings.cache_prefix, ttl_seconds=settings.cache_ttl_seconds
    )

    async def build(
        pool: AsyncConnectionPool[Any], broker: KafkaBroker, dlq: str
    ) -> EventBatchWorker:
        return DirectoryWorker(pool, cache, broker, dlq, DirectoryProjection(tables))

    async def cache_check() -> None:
        await redis_client.ping()

    try:
        await _run(settings, contracts.PATIENT_STREAM, GROUP, "projection", build, cache_check)
    finally:
        await redis_client.aclose()


async def run_appointments(settings: Settings) -> None:
    """Runs the appointments projection until SIGTERM or SIGINT."""

    async def build(
        pool: AsyncConnectionPool[Any], broker: KafkaBroker, dlq: str
    ) -> EventBatchWorker:
        return AppointmentsWorker(pool, broker, dlq)

    await _run(settings, contracts.APPOINTMENT_STREAM, APPOINTMENTS_GROUP, "appointments", build)


async def run_analytics(settings: Settings) -> None:
    """Runs the analytics projection (three streams, one consumer group) until stopped."""

    async def build(
        pool: AsyncConnectionPool[Any], broker: KafkaBroker, dlq: str
    ) -> EventBatchWorker:
        return AnalyticsWorker(pool, broker, dlq)

    streams = [contracts.PATIENT_STREAM, contracts.APPOINTMENT_STREAM, BILLING_STREAM]
    await _run(settings, streams, ANALYTICS_GROUP, "analytics", build)


async def run_patient_removals(settings: Settings) -> None:
    """Runs the process manager that cancels removed patients' appointments."""
    store = await anyio.to_thread.run_sync(EventStore, settings.database_url, 4)
    scheduling = SchedulingService(store)

    async def build(
        pool: AsyncConnectionPool[Any], broker: KafkaBroker, dlq: str
    ) -> EventBatchWorker:
        return PatientRemovals(scheduling, pool, broker, dlq)

    try:
        await _run(settings, contracts.PATIENT_STREAM, REMOVALS_GROUP, "reactions", build)
    finally:
        await anyio.to_thread.run_sync(store.close)


def dead_letter_topic(settings: Settings, streams: list[str], group: str) -> str:
    """`<topic>.dlq.<group>`: of the one topic consumed, or of `analytics` for several."""
    base = streams[0] if len(streams) == 1 else "analytics"
    return f"{settings.topic(base)}.dlq.{group}"


async def _run(
    settings: Settings,
    stream: str | list[str],
    group_name: str,
    port: str,
    build: Build,
    cache: Check | None = None,
) -> None:
    streams = [stream] if isinstance(stream, str) else stream
    topics = [settings.topic(s) for s in streams]
    # The topic prefix keeps test runs out of the live stack's consumer group.
    group = f"{settings.topic_prefix}{group_name}"
    dlq = dead_letter_topic(settings, streams, group_name)
    await wait_for_kafka(settings)
    await ensure_topics(settings, topics)
    await ensure_topics(settings, [dlq], partitions=1)
    pool = await open_pool(settings.database_url, min_size=1, max_size=4)
    broker = kafka_broker(settings, group)
    keyring = Keyring.from_settings(settings)
    keyring.listen()
    subscribe(broker, topics, await build(pool, broker, dlq), group, keyring)

    database, kafka = database_check(pool), broker_check(broker)
    checks: dict[str, Check] = {"database": database, "kafka": kafka}
    if cache is not None:
        checks["cache"] = cache
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await broker.start()
    server = await serve_health(checks, settings.http_host, settings.ports[port])
    settle_heap()
    log.info("projection started", topics=topics, group=group)
    started = time.monotonic()
    await stopping.wait()
    log.info("projection stopping", topics=topics, uptime=round(time.monotonic() - started, 1))
    await server.stop()
    await broker.stop()
    await pool.close()
    await anyio.to_thread.run_sync(keyring.close)
