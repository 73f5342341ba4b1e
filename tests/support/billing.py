"""Test support for billing: the service in process, patient events to feed it, callers with
tokens, and a look at its database."""

from __future__ import annotations

import importlib
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from types import ModuleType
from typing import Any
from uuid import UUID

import msgspec
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from grpc_tools import protoc
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from billing_grpc.config import BillingConfig
from billing_grpc.generated.carelog.billing import v1 as pb
from bootstrap.billing import Running, start
from domain import contracts
from domain.contracts import Envelope, PatientRegisteredV1, PatientRemovedV1
from domain.roles import Role
from runtime.kafka import reliable_producer
from runtime.settings import Settings
from tests.support.stack import ROOT, eventually
from tests.support.tokens import TestTokens

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


def bearer(tokens: TestTokens, role: Role = Role.BILLING) -> dict[str, str]:
    """Call metadata with a fresh access token of `role`."""
    return {"authorization": f"Bearer {tokens.token(role)}"}


async def account_if_any(stub: pb.BillingServiceStub, patient_id: UUID) -> Any:
    """The patient's account, or None while billing has none."""
    try:
        return await stub.get_billing_account(
            pb.GetBillingAccountRequest(patient_id=str(patient_id))
        )
    except GRPCError as error:
        if error.status is not Status.NOT_FOUND:
            raise
        return None


async def register(
    stub: pb.BillingServiceStub,
    producer: AIOKafkaProducer,
    settings: Settings,
    patient_id: UUID | None = None,
) -> pb.BillingAccount:
    """Registers a patient the way billing learns of one (PatientRegistered on the patient
    topic) and returns the account billing opens for them."""
    event = registered(patient_id)
    await publish(producer, settings.topic(contracts.PATIENT_STREAM), event)
    account: pb.BillingAccount = await eventually(lambda: account_if_any(stub, event.aggregate_id))
    return account


@pytest.fixture(scope="module")
async def billing(settings: Settings, tokens: TestTokens) -> AsyncIterator[Running]:
    """Billing running in this test process (gRPC, consumer and outbox relay) on free ports;
    it trusts the test session's token key."""
    config = BillingConfig(
        grpc_port=settings.ports["billing-grpc"], http_port=settings.ports["billing-http"]
    )
    running = await start(settings, config, verifier=tokens.verifier)
    yield running
    await running.stop()


@pytest.fixture(scope="module")
async def stub(
    settings: Settings, billing: Running, tokens: TestTokens
) -> AsyncIterator[pb.BillingServiceStub]:
    """A grpclib client of the running billing service, calling as a billing-role user."""
    channel = Channel("127.0.0.1", settings.ports["billing-grpc"])
    yield pb.BillingServiceStub(channel, timeout=10, metadata=bearer(tokens))
    channel.close()


@pytest.fixture(scope="module")
async def producer(settings: Settings) -> AsyncIterator[AIOKafkaProducer]:
    """A producer of patient events (as the relay publishes them)."""
    kafka = reliable_producer(settings)
    await kafka.start()
    yield kafka
    await kafka.stop()


@pytest.fixture(scope="module")
def grpcio_stubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, ...]]:
    """billing_pb2 and billing_pb2_grpc, generated by grpcio-tools from proto/ for this test."""
    out = tmp_path_factory.mktemp("grpcio_stubs")
    source = ROOT / "proto"
    status = protoc.main(
        [
            "protoc",
            f"-I{source}",
            f"-I{Path(protoc.__file__).parent / '_proto'}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            str(source / "carelog/billing/v1/billing.proto"),
        ]
    )
    assert status == 0
    sys.path.insert(0, str(out))
    try:
        yield (
            importlib.import_module("carelog.billing.v1.billing_pb2"),
            importlib.import_module("carelog.billing.v1.billing_pb2_grpc"),
        )
    finally:
        sys.path.remove(str(out))
        for name in [n for n in sys.modules if n == "carelog" or n.startswith("carelog.")]:
            del sys.modules[name]
