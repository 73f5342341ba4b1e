"""Test support for billing: the service in process, patient events to feed it, and a look
at its database."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from typing import Any
from uuid import UUID

import msgspec
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from grpclib.client import Channel

from billing_grpc.config import BillingConfig
from billing_grpc.generated.carelog.billing import v1 as pb
from bootstrap.billing import Running, start
from domain import contracts
from domain.contracts import Envelope, PatientRegisteredV1, PatientRemovedV1
from runtime.settings import Settings

SCHEMA = "billing"


def registered(patient_id: UUID | None = None, version: int = 1) -> Envelope[Any]:
    """A PatientRegistered envelope as the relay publishes it (unique data each time)."""
    patient_id = patient_id or uuid.uuid4()
    return contracts.envelope(
        PatientRegisteredV1(
            name="Mary Seacole",
            email=f"mary-{uuid.uuid4().hex[:10]}@example.org",
            address="1 Kingston Road",
            date_of_birth=date(1985, 11, 23),
            registered_date=date(2024, 5, 1),
        ),
        aggregate_id=patient_id,
        aggregate_version=version,
        position=1,
        occurred_at=datetime.now(UTC),
        correlation_id=f"test-{uuid.uuid4().hex[:8]}",
    )


def removed(patient_id: UUID, version: int = 2) -> Envelope[Any]:
    return contracts.envelope(
        PatientRemovedV1(),
        aggregate_id=patient_id,
        aggregate_version=version,
        position=2,
        occurred_at=datetime.now(UTC),
    )


async def publish(producer: AIOKafkaProducer, topic: str, *envelopes: Envelope[Any]) -> None:
    """Publishes envelopes keyed by patient, and waits until Kafka has them."""
    deliveries = [
        await producer.send(topic, msgspec.json.encode(e), key=str(e.aggregate_id).encode())
        for e in envelopes
    ]
    for delivery in deliveries:
        await delivery


async def accounts_of(database_url: str, patient_id: UUID, schema: str = SCHEMA) -> list[Any]:
    """Every account row of a patient (the rule says: never more than one)."""
    async with await psycopg.AsyncConnection.connect(database_url) as db:
        cur = await db.execute(
            f"SELECT id, status, version FROM {schema}.accounts WHERE patient_id = %s",
            [patient_id],
        )
        return await cur.fetchall()


async def outbox_types(database_url: str, account_id: UUID, schema: str = SCHEMA) -> list[str]:
    """The account's events in the outbox, oldest first."""
    async with await psycopg.AsyncConnection.connect(database_url) as db:
        cur = await db.execute(
            f"SELECT type FROM {schema}.outbox WHERE aggregate_id = %s ORDER BY aggregate_version",
            [account_id],
        )
        return [row[0] for row in await cur.fetchall()]


@pytest.fixture(scope="module")
async def billing(settings: Settings) -> AsyncIterator[Running]:
    """Billing running in this test process (gRPC, consumer and outbox relay) on free ports."""
    config = BillingConfig(
        grpc_port=settings.ports["billing-grpc"], http_port=settings.ports["billing-http"]
    )
    running = await start(settings, config)
    yield running
    await running.stop()


@pytest.fixture(scope="module")
async def stub(settings: Settings, billing: Running) -> AsyncIterator[pb.BillingServiceStub]:
    """A grpclib client of the running billing service."""
    channel = Channel("127.0.0.1", settings.ports["billing-grpc"])
    yield pb.BillingServiceStub(channel, timeout=10)
    channel.close()
