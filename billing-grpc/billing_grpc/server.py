"""The billing process's composition root: gRPC on 9001, health and metrics on 4001.

One process runs the gRPC server (BillingService, grpc.health.v1.Health and
server reflection), the consumer group on `patient.events`, and the outbox relay
that publishes `billing.events`.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from faststream.kafka import KafkaBroker
from google.protobuf import descriptor_pool
from grpclib.events import RecvRequest, listen
from grpclib.health.check import ServiceCheck
from grpclib.health.service import Health
from grpclib.reflection.service import ServerReflection
from grpclib.server import Server

from billing_grpc.api import BillingApi, on_request
from billing_grpc.config import BillingConfig
from billing_grpc.consumer import PatientEventsWorker
from billing_grpc.generated.google_proto_descriptor_pool import (
    default_google_proto_descriptor_pool,
)
from billing_grpc.outbox import OutboxRelay
from billing_grpc.service import Billing
from billing_grpc.store import create_schema
from domain import contracts
from domain.billing import BILLING_STREAM
from runtime.consumers import subscribe
from runtime.db import open_pool
from runtime.http import HealthServer, serve_health
from runtime.kafka import ensure_topics, kafka_broker, reliable_producer, wait_for_kafka
from runtime.settings import Settings, SettingsError

log = structlog.get_logger(__name__)


class _Pools:
    """Descriptor lookups in billing's generated pool, then the default one (which holds
    grpc.health.v1 and the reflection service), so reflection can describe every service."""

    def __init__(self, *pools: Any):
        self._pools = pools

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def find(*args: Any) -> Any:
            for pool in self._pools:
                try:
                    return getattr(pool, name)(*args)
                except KeyError:
                    continue
            raise KeyError(args)

        return find


def services_of(api: BillingApi, database_check: ServiceCheck) -> list[Any]:
    """BillingService, health (NOT_SERVING while the database is down) and reflection."""
    health = Health({api: [database_check]})
    pools = _Pools(default_google_proto_descriptor_pool, descriptor_pool.Default())
    return ServerReflection.extend([api, health], pool=pools)


@dataclass
class Running:
    """A started billing process; `stop()` shuts it down in order."""

    server: Server
    broker: KafkaBroker
    relay: OutboxRelay
    relay_task: asyncio.Task[None]
    http: HealthServer
    producer: Any
    pool: Any

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()
        await self.broker.stop()
        self.relay.stop()
        await self.relay_task
        await self.producer.stop()
        await self.http.stop()
        await self.pool.close()


async def start(settings: Settings, config: BillingConfig) -> Running:
    """Wires and starts every part of billing; returns once it serves."""
    patient_topic = settings.topic(contracts.PATIENT_STREAM)
    billing_topic = settings.topic(BILLING_STREAM)
    # The topic prefix keeps test runs out of the live stack's consumer group.
    group = f"{settings.topic_prefix}{config.consumer_group}"
    dlq = f"{patient_topic}.dlq.{config.consumer_group}"
    await wait_for_kafka(settings.kafka_bootstrap)
    await ensure_topics(settings.kafka_bootstrap, [patient_topic, billing_topic])
    await ensure_topics(settings.kafka_bootstrap, [dlq], partitions=1)

    pool = await open_pool(settings.database_url, min_size=2, max_size=config.pool_size)
    async with pool.connection() as conn:
        await create_schema(conn, config.schema)
    billing = Billing(pool, config.schema, config.currency)

    producer = reliable_producer(settings.kafka_bootstrap)
    await producer.start()
    relay = OutboxRelay(settings.database_url, producer, config.schema, billing_topic)

    broker = kafka_broker(settings, group)
    subscribe(broker, patient_topic, PatientEventsWorker(billing, broker, dlq), group)

    async def database() -> None:
        async with pool.connection() as conn:
            await conn.execute("SELECT 1")

    async def database_ok() -> bool:
        await database()
        return True

    async def kafka() -> None:
        if not await broker.ping(timeout=2.0):
            raise ConnectionError("broker does not answer")

    async def outbox() -> None:
        if time.monotonic() - relay.last_cycle > 10:
            raise TimeoutError("no outbox relay cycle completed in the last 10 s")

    api = BillingApi(billing)
    server = Server(services_of(api, ServiceCheck(database_ok, check_ttl=5, check_timeout=2)))
    listen(server, RecvRequest, on_request)
    await server.start(settings.http_host, config.grpc_port)
    await broker.start()
    relay_task = asyncio.get_running_loop().create_task(relay.run())
    http = await serve_health(
        {"database": database, "kafka": kafka, "outbox": outbox},
        settings.http_host,
        config.http_port,
    )
    log.info(
        "billing started",
        grpc_port=config.grpc_port,
        http_port=config.http_port,
        consumes=patient_topic,
        publishes=billing_topic,
        schema=config.schema,
    )
    return Running(server, broker, relay, relay_task, http, producer, pool)


async def run(settings: Settings, config: BillingConfig | None = None) -> None:
    """Runs billing until SIGTERM or SIGINT."""
    try:
        config = config or BillingConfig.from_env()
    except SettingsError as exc:
        raise SystemExit(f"carelog billing: {exc}") from None
    running = await start(settings, config)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    started = time.monotonic()
    await stopping.wait()
    log.info("billing stopping", uptime=round(time.monotonic() - started, 1))
    await running.stop()
