"""Who may call billing, asked of a real billing process (`carelog serve billing`) by a
grpcio client: the process fetches the token keys from a JWKS URL, as it does beside
the auth service, and every BillingService call must show a token its method admits.
Health and reflection stay open. No account opens for a patient billing never saw
registered, and a refused call writes nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import httpx
import psycopg
import pytest
from aiokafka import AIOKafkaProducer
from grpclib.health.v1 import health_pb2
from grpclib.reflection.v1 import reflection_pb2

from billing_grpc.access import METHOD_ROLES
from domain.billing import account_id_for
from domain.contracts import PATIENT_STREAM
from domain.roles import Role
from runtime.kafka import reliable_producer
from runtime.settings import Settings
from tests.support.billing import accounts_of, grpcio_stubs, outbox_types, publish, registered
from tests.support.stack import Process, eventually, isolated_settings
from tests.support.tokens import BAD_TOKEN_KINDS, TestTokens, served_jwks

pytestmark = pytest.mark.integration

__all__ = ["grpcio_stubs"]  # fixtures

SERVICE = "carelog.billing.v1.BillingService"
Metadata = tuple[tuple[str, str], ...]


# --- A billing process that trusts this test session's key ------------------------------


@pytest.fixture(scope="module")
def jwks_url(tokens: TestTokens) -> Iterator[str]:
    with served_jwks(tokens) as url:
        yield url


@pytest.fixture(scope="module")
def own() -> Iterator[Settings]:
    """A database and topics of this module's own, for the billing process."""
    with isolated_settings("ba") as isolated:
        yield isolated


@pytest.fixture(scope="module")
def process(
    own: Settings, jwks_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Process]:
    billing = Process(
        ["serve", "billing"],
        own,
        "billing-http",
        Path(tmp_path_factory.mktemp("billing")) / "billing",
        env={"CARELOG_JWKS_URL": jwks_url},
    )
    billing.start()
    yield billing
    billing.stop()


@pytest.fixture(scope="module")
def channel(own: Settings, process: Process) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{own.ports['billing-grpc']}") as opened:
        yield opened


@pytest.fixture(scope="module")
async def producer(own: Settings) -> AsyncIterator[AIOKafkaProducer]:
    kafka = reliable_producer(own)
    await kafka.start()
    yield kafka
    await kafka.stop()


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


async def in_thread(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """grpcio's blocking calls run in a thread, so this loop stays free."""
    return await asyncio.to_thread(call, *args, **kwargs)


class Caller:
    """Every BillingService method with a valid request about one registered patient."""

    def __init__(self, stubs: tuple[ModuleType, ...], channel: grpc.Channel, patient_id: str):
        pb2, pb2_grpc = stubs
        self.client = pb2_grpc.BillingServiceStub(channel)
        self.patient_id = patient_id
        self.account_id = str(account_id_for(uuid.UUID(patient_id)))
        self.requests = {
            "CreateBillingAccount": pb2.CreateBillingAccountRequest(
                patient_id=patient_id, name="Mary Seacole", email="mary@example.org"
            ),
            "GetBillingAccount": pb2.GetBillingAccountRequest(patient_id=patient_id),
            "ListBillingAccounts": pb2.ListBillingAccountsRequest(page_size=1),
            "CreateInvoice": pb2.CreateInvoiceRequest(
                account_id=self.account_id,
                currency_code="GBP",
                lines=[pb2.InvoiceLine(description="Visit", quantity=1, unit_amount_minor=100)],
            ),
            "ListInvoices": pb2.ListInvoicesRequest(account_id=self.account_id),
            "RecordPayment": pb2.RecordPaymentRequest(
                account_id=self.account_id,
                amount=pb2.Money(currency_code="GBP", amount_minor=1),
            ),
        }

    async def call(self, method: str, metadata: Metadata | None = None) -> Any:
        rpc = getattr(self.client, method)
        return await in_thread(rpc, self.requests[method], timeout=10, metadata=metadata)

    async def code(self, method: str, metadata: Metadata | None = None) -> grpc.StatusCode:
        try:
            await self.call(method, metadata)
        except grpc.RpcError as error:
            return error.code()
        return grpc.StatusCode.OK


@pytest.fixture
async def caller(grpcio_stubs, channel, producer, own: Settings, tokens: TestTokens) -> Caller:
    """A newly registered patient whose account has 10,000 invoiced, so a payment can land."""
    event = registered()
    await publish(producer, own.topic(PATIENT_STREAM), event)
    await eventually(lambda: accounts_of(own.database_url, event.aggregate_id), timeout=60)
    caller = Caller(grpcio_stubs, channel, str(event.aggregate_id))
    pb2 = grpcio_stubs[0]
    await in_thread(
        caller.client.CreateInvoice,
        pb2.CreateInvoiceRequest(
            account_id=caller.account_id,
            currency_code="GBP",
            lines=[pb2.InvoiceLine(description="Visit", quantity=1, unit_amount_minor=10_000)],
        ),
        timeout=10,
        metadata=bearer(tokens.token(Role.BILLING)),
    )
    return caller


async def state(settings: Settings, account_id: str) -> tuple[Any, ...]:
    """What billing holds about an account: its totals and version, its invoices, payments
    and events, and how many accounts there are in all."""
    async with await psycopg.AsyncConnection.connect(settings.database_url) as db:
        row = await (
            await db.execute(
                "SELECT a.invoiced_minor, a.paid_minor, a.version,"
                " (SELECT count(*) FROM billing.invoices WHERE account_id = a.id),"
                " (SELECT count(*) FROM billing.payments WHERE account_id = a.id),"
                " (SELECT count(*) FROM billing.outbox WHERE aggregate_id = a.id),"
                " (SELECT count(*) FROM billing.accounts)"
                " FROM billing.accounts a WHERE a.id = %s",
                [uuid.UUID(account_id)],
            )
        ).fetchone()
    assert row is not None
    return tuple(row)


# --- No token, or a bad one -------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHOD_ROLES))
async def test_every_method_without_a_token_is_unauthenticated(caller: Caller, method: str):
    with pytest.raises(grpc.RpcError) as caught:
        await caller.call(method)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "bearer token" in (caught.value.details() or "")


@pytest.mark.parametrize("kind", BAD_TOKEN_KINDS)
async def test_forged_expired_and_foreign_tokens_are_unauthenticated(
    caller: Caller, tokens: TestTokens, kind: str
):
    forged = bearer(tokens.forged(kind))
    for method in sorted(METHOD_ROLES):
        assert await caller.code(method, forged) == grpc.StatusCode.UNAUTHENTICATED, method


@pytest.mark.parametrize(
    "authorization",
    ["", "Bearer", "Bearer ", "Basic dXNlcjpwYXNzd29yZA==", "{token}", "Token {token}"],
)
async def test_a_malformed_authorization_is_unauthenticated(
    caller: Caller, tokens: TestTokens, authorization: str
):
    metadata = (("authorization", authorization.format(token=tokens.token(Role.ADMIN))),)
    assert await caller.code("GetBillingAccount", metadata) == grpc.StatusCode.UNAUTHENTICATED


async def test_two_authorizations_are_unauthenticated(caller: Caller, tokens: TestTokens):
    metadata = (*bearer(tokens.token(Role.ANALYST)), *bearer(tokens.token(Role.ADMIN)))
    assert await caller.code("GetBillingAccount", metadata) == grpc.StatusCode.UNAUTHENTICATED


async def test_refused_calls_write_nothing_and_are_counted(
    caller: Caller, tokens: TestTokens, own: Settings
):
    before = await state(own, caller.account_id)
    analyst = bearer(tokens.token(Role.ANALYST))
    for metadata in (None, bearer(tokens.forged("expired")), analyst):
        for method in ("CreateInvoice", "RecordPayment", "CreateBillingAccount"):
            assert await caller.code(method, metadata) in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
            )
    assert await state(own, caller.account_id) == before
    async with httpx.AsyncClient() as http:
        metrics = (await http.get(f"http://127.0.0.1:{own.ports['billing-http']}/metrics")).text
    # A billing process exports only billing's series: no relay-shaped gauge, no relay.
    assert "carelog_publisher_position" not in metrics
    assert 'publisher="kafka"' not in metrics
    counted = [line for line in metrics.splitlines() if "carelog_grpc_requests_total{" in line]
    for code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        assert any(
            'grpc_service="carelog.billing.v1.BillingService"' in line
            and 'grpc_method="CreateInvoice"' in line
            and f'grpc_code="{code}"' in line
            for line in counted
        ), counted


# --- Roles ------------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
async def test_each_role_calls_exactly_the_methods_it_is_admitted_to(
    caller: Caller, tokens: TestTokens, role: Role
):
    metadata = bearer(tokens.token(role))
    got = {method: await caller.code(method, metadata) for method in METHOD_ROLES}
    expected = {
        method: grpc.StatusCode.OK if role in roles else grpc.StatusCode.PERMISSION_DENIED
        for method, roles in METHOD_ROLES.items()
    }
    assert got == expected


async def test_a_clinician_reads_an_account_but_may_not_charge_it(
    caller: Caller, tokens: TestTokens, own: Settings
):
    clinician = bearer(tokens.token(Role.CLINICIAN))
    account = await caller.call("GetBillingAccount", clinician)
    assert account.balance.amount_minor == 10_000
    before = await state(own, caller.account_id)
    for method in ("CreateInvoice", "RecordPayment"):
        with pytest.raises(grpc.RpcError) as caught:
            await caller.call(method, clinician)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert method in (caught.value.details() or "")
    assert await state(own, caller.account_id) == before


async def test_an_analyst_may_call_nothing(caller: Caller, tokens: TestTokens):
    analyst = bearer(tokens.token(Role.ANALYST))
    for method in METHOD_ROLES:
        assert await caller.code(method, analyst) == grpc.StatusCode.PERMISSION_DENIED, method


# --- Unknown patients -------------------------------------------------------------------


async def test_no_account_opens_for_a_patient_billing_never_saw_registered(
    grpcio_stubs, channel, tokens: TestTokens, own: Settings
):
    pb2, pb2_grpc = grpcio_stubs
    client = pb2_grpc.BillingServiceStub(channel)
    stranger = uuid.uuid4()
    for role in (Role.ADMIN, Role.RECEPTIONIST, Role.BILLING):
        with pytest.raises(grpc.RpcError) as caught:
            await in_thread(
                client.CreateBillingAccount,
                pb2.CreateBillingAccountRequest(
                    patient_id=str(stranger), name="Nobody Known", email="nobody@example.org"
                ),
                timeout=10,
                metadata=bearer(tokens.token(role)),
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert "registered" in (caught.value.details() or "")
    assert await accounts_of(own.database_url, stranger) == []
    assert await outbox_types(own.database_url, account_id_for(stranger)) == []
    for method, request in (
        ("CreateInvoice", pb2.CreateInvoiceRequest),
        ("RecordPayment", pb2.RecordPaymentRequest),
    ):
        fields: dict[str, Any] = {"account_id": str(account_id_for(stranger))}
        if method == "CreateInvoice":
            fields |= {
                "currency_code": "GBP",
                "lines": [pb2.InvoiceLine(description="Visit", quantity=1, unit_amount_minor=5)],
            }
        else:
            fields["amount"] = pb2.Money(currency_code="GBP", amount_minor=5)
        with pytest.raises(grpc.RpcError) as caught:
            await in_thread(
                getattr(client, method),
                request(**fields),
                timeout=10,
                metadata=bearer(tokens.token(Role.ADMIN)),
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# --- Open without a token ---------------------------------------------------------------


async def test_health_answers_without_a_token(channel):
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    for service in ("", SERVICE):
        answer = await in_thread(check, health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
async def test_reflection_answers_without_a_token(channel, version: str):
    call = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )

    def ask() -> Any:
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        return next(iter(call(iter([request]), timeout=10)))

    answer = await in_thread(ask)
    assert SERVICE in {s.name for s in answer.list_services_response.service}
