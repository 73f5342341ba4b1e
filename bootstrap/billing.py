"""The billing process: gRPC on 9001, health and metrics on 4001.

One process runs the gRPC server (BillingService, grpc.health.v1.Health and
server reflection), the consumer group on `patient.events`, and the publisher of
its outbox to `billing.events`. BillingService calls need a bearer token; health
and reflection stay open.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass
from typing import Any

import structlog
from faststream.kafka import KafkaBroker
from grpclib.events import RecvRequest, listen
from grpclib.health.check import ServiceCheck
from grpclib.server import Server

from billing_grpc.access import Gate
from billing_grpc.api import BillingApi, on_request
from billing_grpc.config import BillingConfig
from billing_grpc.consumer import PatientEventsWorker
from billing_grpc.outbox import BillingOutbox
from billing_grpc.server import services_of
from billing_grpc.service import Billing
from billing_grpc.store import SCHEMA
from domain import contracts
from domain.billing import BILLING_STREAM
from runtime.consumers import subscribe
from runtime.crypto import Keyring
from runtime.db import open_pool
from runtime.http import HealthServer, serve_health, settle_heap
from runtime.kafka import ensure_topics, kafka_broker, reliable_producer, wait_for_kafka
from runtime.publisher import Publisher
from runtime.security import TokenVerifier
from runtime.settings import Settings

log = structlog.get_logger(__name__)


@dataclass
class Running:
    """A started billing process; `stop()` shuts it down in order."""

    server: Server
    broker: KafkaBroker
    relay: Publisher
    relay_task: asyncio.Task[None]
    http: HealthServer
    producer: Any
    pool: Any
    verifier: TokenVerifier
    keyring: Keyring | None = None

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()
        await self.verifier.stop()
        await self.broker.stop()
        self.relay.stop()
        await self.relay_task
        await self.producer.stop()
        await self.http.stop()
        await self.pool.close()
        if self.keyring is not None:
            self.keyring.close()


async def start(
    settings: Settings, config: BillingConfig, verifier: TokenVerifier | None = None
) -> Running:
    """Wires and starts every part of billing; returns once it serves.

    Tokens are checked with `verifier` (tests pass their own); by default with the auth
    service's keys, issuer and audience from the settings, like the HTTP services.
    """
    patient_topic = settings.topic(contracts.PATIENT_STREAM)
    billing_topic = settings.topic(BILLING_STREAM)
    # The topic prefix keeps test runs out of the live stack's consumer group.
    group = f"{settings.topic_prefix}{config.consumer_group}"
    dlq = f"{patient_topic}.dlq.{config.consumer_group}"
    await wait_for_kafka(settings)
    await ensure_topics(settings, [patient_topic, billing_topic])
    await ensure_topics(settings, [dlq], partitions=1)

    pool = await open_pool(settings.database_url, min_size=2, max_size=config.pool_size)
    billing = Billing(pool, SCHEMA, config.currency)

    producer = reliable_producer(settings)
    await producer.start()
    source = BillingOutbox(settings.database_url, SCHEMA, billing_topic)
    relay = Publisher(source, producer)

    broker = kafka_broker(settings, group)
    keyring = Keyring.from_settings(settings)
    keyring.listen()
    subscribe(broker, patient_topic, PatientEventsWorker(billing, broker, dlq), group, keyring)

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
        if source.leader and time.monotonic() - relay.last_cycle > 10:
            raise TimeoutError("no outbox relay cycle completed in the last 10 s")

    verifier = verifier or TokenVerifier.from_settings(settings)
    await verifier.start()  # the revocations in force, before the first call is admitted
    api = BillingApi(billing)
    server = Server(services_of(api, ServiceCheck(database_ok, check_ttl=5, check_timeout=2)))
    listen(server, RecvRequest, Gate(verifier))
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
        schema=SCHEMA,
    )
    return Running(server, broker, relay, relay_task, http, producer, pool, verifier, keyring)


async def run(settings: Settings, config: BillingConfig) -> None:
    """Runs billing until SIGTERM or SIGINT."""
    running = await start(settings, config)
    settle_heap()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    started = time.monotonic()
    await stopping.wait()
    log.info("billing stopping", uptime=round(time.monotonic() - started, 1))
    await running.stop()
