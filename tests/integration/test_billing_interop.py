"""Billing as any gRPC client sees it: grpcio (Google's implementation, not grpclib) with
stubs built from proto/ here, the standard health protocol, and server reflection (what
`grpcurl -plaintext localhost:9001 list` and `describe` use, with no .proto at hand).

The health and reflection messages are the standard protobuf classes that grpclib ships:
protobuf's global pool can hold only one copy of `grpc.health.v1`, so grpcio-health-checking's
own copy cannot be imported beside the server. The wire format is the same either way.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import grpc
import httpx
import psycopg
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpclib.health.v1 import health_pb2
from grpclib.reflection.v1 import reflection_pb2

from domain.roles import Role
from runtime.settings import Settings
from tests.support.billing import billing, grpcio_stubs, producer, register, stub
from tests.support.tokens import TestTokens

pytestmark = pytest.mark.integration

__all__ = ["billing", "grpcio_stubs", "producer", "stub"]  # fixtures

SERVICE = "carelog.billing.v1.BillingService"


@pytest.fixture(scope="module")
def channel(settings: Settings, billing) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{settings.ports['billing-grpc']}") as opened:
        yield opened


@pytest.fixture(scope="module")
def token(tokens: TestTokens) -> tuple[tuple[str, str]]:
    """grpcio call metadata with a billing-role access token."""
    return (("authorization", f"Bearer {tokens.token(Role.BILLING)}"),)


async def in_thread(call, *args, **kwargs):
    """grpcio's blocking calls run in a thread, so the server in this loop can answer."""
    return await asyncio.to_thread(call, *args, **kwargs)


async def test_a_grpcio_client_built_from_the_proto_talks_to_the_server(
    grpcio_stubs, channel, token, stub, producer, settings: Settings
):
    billing_pb2, billing_pb2_grpc = grpcio_stubs
    client = billing_pb2_grpc.BillingServiceStub(channel)
    patient_id = (await register(stub, producer, settings)).patient_id
    created = await in_thread(
        client.CreateBillingAccount,
        billing_pb2.CreateBillingAccountRequest(
            patient_id=patient_id, name="Florence Nightingale", email="flo@example.org"
        ),
        timeout=10,
        metadata=token,
    )
    assert created.status == "ACTIVE"
    assert created.account.patient_id == patient_id
    issued = await in_thread(
        client.CreateInvoice,
        billing_pb2.CreateInvoiceRequest(
            account_id=created.account_id,
            currency_code="GBP",
            lines=[
                billing_pb2.InvoiceLine(description="Visit", quantity=2, unit_amount_minor=1500)
            ],
        ),
        timeout=10,
        metadata=token,
    )
    assert issued.invoice.total.amount_minor == 3000
    paid = await in_thread(
        client.RecordPayment,
        billing_pb2.RecordPaymentRequest(
            account_id=created.account_id,
            amount=billing_pb2.Money(currency_code="GBP", amount_minor=1000),
        ),
        timeout=10,
        metadata=token,
    )
    assert paid.account.balance.amount_minor == 2000
    got = await in_thread(
        client.GetBillingAccount,
        billing_pb2.GetBillingAccountRequest(patient_id=patient_id),
        timeout=10,
        metadata=token,
    )
    assert got.account_id == created.account_id
    assert got.status == billing_pb2.ACCOUNT_STATUS_OPEN
    assert got.opened_at.seconds > 0
    assert not got.HasField("closed_at")


@pytest.mark.parametrize(
    ("request_fields", "code", "field"),
    [
        ({"patient_id": "nope"}, grpc.StatusCode.INVALID_ARGUMENT, "patient_id"),
        ({"patient_id": str(uuid.uuid4())}, grpc.StatusCode.NOT_FOUND, None),
    ],
)
async def test_grpcio_sees_the_right_status_codes(
    grpcio_stubs, channel, token, request_fields, code, field
):
    billing_pb2, billing_pb2_grpc = grpcio_stubs
    client = billing_pb2_grpc.BillingServiceStub(channel)
    with pytest.raises(grpc.RpcError) as caught:
        await in_thread(
            client.GetBillingAccount,
            billing_pb2.GetBillingAccountRequest(**request_fields),
            timeout=10,
            metadata=token,
        )
    assert caught.value.code() == code
    if field:
        assert field in caught.value.details()


async def test_a_call_past_its_deadline_is_deadline_exceeded_for_grpcio(
    grpcio_stubs, channel, token, stub, producer, settings: Settings
):
    billing_pb2, billing_pb2_grpc = grpcio_stubs
    client = billing_pb2_grpc.BillingServiceStub(channel)
    created = await register(stub, producer, settings)
    invoice = billing_pb2.CreateInvoiceRequest(
        account_id=created.account_id,
        currency_code="GBP",
        lines=[billing_pb2.InvoiceLine(description="Visit", quantity=1, unit_amount_minor=100)],
    )
    async with (
        await psycopg.AsyncConnection.connect(settings.database_url) as blocker,
        blocker.transaction(),
    ):
        await blocker.execute(
            "SELECT 1 FROM billing.accounts WHERE id = %s FOR UPDATE",
            [uuid.UUID(created.account_id)],
        )
        with pytest.raises(grpc.RpcError) as caught:
            await in_thread(client.CreateInvoice, invoice, timeout=0.3, metadata=token)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    listed = await in_thread(
        client.ListInvoices,
        billing_pb2.ListInvoicesRequest(account_id=created.account_id),
        timeout=10,
        metadata=token,
    )
    assert list(listed.invoices) == []


async def test_the_standard_health_service_answers_serving(channel):
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    for service in ("", SERVICE):
        answer = await in_thread(check, health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as caught:
        await in_thread(check, health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_and_metrics_over_http(settings: Settings, billing):
    base = f"http://127.0.0.1:{settings.ports['billing-http']}"
    async with httpx.AsyncClient(base_url=base) as client:
        ready = await client.get("/health/ready")
        assert ready.status_code == 200, ready.text
        assert set(ready.json()["checks"]) == {"database", "kafka", "outbox"}
        metrics = (await client.get("/metrics")).text
    assert "carelog_grpc_requests_total" in metrics
    assert "carelog_publisher_published_total" in metrics  # its outbox publisher
    assert 'carelog_publisher_lag_events{publisher="billing-outbox:' in metrics


def _reflect(
    channel: grpc.Channel, request: reflection_pb2.ServerReflectionRequest, version: str = "v1"
) -> reflection_pb2.ServerReflectionResponse:
    """One question to the reflection service (v1alpha has the same messages on the wire)."""
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return next(iter(call(iter([request]), timeout=10)))


def _describe(channel: grpc.Channel, symbol: str) -> descriptor_pool.DescriptorPool:
    """What `grpcurl describe` does: fetch the file that defines `symbol`, and its imports."""
    pool = descriptor_pool.DescriptorPool()
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    wanted = [reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)]
    while wanted:
        answer = _reflect(channel, wanted.pop())
        assert answer.WhichOneof("message_response") == "file_descriptor_response", answer
        for raw in answer.file_descriptor_response.file_descriptor_proto:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            files[proto.name] = proto
            wanted.extend(
                reflection_pb2.ServerReflectionRequest(file_by_filename=name)
                for name in proto.dependency
                if name not in files
            )
    added: set[str] = set()

    def add(name: str) -> None:
        if name not in added:
            for dependency in files[name].dependency:
                add(dependency)
            pool.Add(files[name])
            added.add(name)

    for name in files:
        add(name)
    return pool


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_lists_the_services(channel, version):
    answer = await in_thread(
        _reflect, channel, reflection_pb2.ServerReflectionRequest(list_services=""), version
    )
    names = {s.name for s in answer.list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health"} <= names


async def test_reflection_describes_the_services_with_no_proto_at_hand(channel):
    billing_pool = await in_thread(_describe, channel, SERVICE)
    service = billing_pool.FindServiceByName(SERVICE)
    assert [m.name for m in service.methods] == [
        "CreateBillingAccount",
        "GetBillingAccount",
        "ListBillingAccounts",
        "CreateInvoice",
        "ListInvoices",
        "RecordPayment",
    ]
    money = billing_pool.FindMessageTypeByName("carelog.billing.v1.Money")
    assert [f.name for f in money.fields] == ["currency_code", "amount_minor"]
    account = billing_pool.FindMessageTypeByName("carelog.billing.v1.BillingAccount")
    assert account.fields_by_name["opened_at"].message_type.full_name == (
        "google.protobuf.Timestamp"
    )
    health_pool = await in_thread(_describe, channel, "grpc.health.v1.Health")
    check = health_pool.FindServiceByName("grpc.health.v1.Health").methods_by_name["Check"]
    assert check.input_type.full_name == "grpc.health.v1.HealthCheckRequest"


async def test_reflection_says_not_found_for_an_unknown_symbol(channel):
    answer = await in_thread(
        _reflect,
        channel,
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Thing"),
    )
    assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
