"""Billing reacting to patient events, and publishing its own, on the real Kafka and PostgreSQL.

Exactly one account per patient whatever happens: the event and calls racing,
redelivery, a replay of the whole topic. What cannot be applied is dead-lettered
and the consumer carries on.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, date, datetime
from typing import Any

import msgspec
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from grpclib import GRPCError
from grpclib.const import Status
from litestar.testing import AsyncTestClient

from billing_grpc.generated.carelog.billing import v1 as pb
from billing_grpc.service import Billing
from bootstrap.billing import Running
from commands.api import create_app
from commands.relay import EventStoreLog
from commands.store import EventStore
from domain import contracts
from domain.billing import BILLING_STREAM, account_id_for, decode_billing_event
from domain.contracts import PATIENT_STREAM, PatientDetailsChangedV1
from domain.roles import Role
from runtime.consumers import UnappliableEvent
from runtime.kafka import EVENT_PARTITIONS, client_options, ensure_topics, reliable_producer
from runtime.publisher import Publisher
from runtime.settings import Settings
from tests.support.billing import (
    SCHEMA,
    accounts_of,
    bearer,
    billing,
    outbox_types,
    producer,
    publish,
    registered,
    removed,
    stub,
)
from tests.support.patients import body
from tests.support.stack import eventually, read_topic
from tests.support.tokens import TestTokens

pytestmark = pytest.mark.integration

__all__ = ["billing", "producer", "stub"]  # fixtures


@pytest.fixture
def patients_topic(settings: Settings) -> str:
    return settings.topic(PATIENT_STREAM)


async def account_of(stub: pb.BillingServiceStub, patient_id: uuid.UUID) -> pb.BillingAccount:
    return await stub.get_billing_account(pb.GetBillingAccountRequest(patient_id=str(patient_id)))


async def has_account(stub: pb.BillingServiceStub, patient_id: uuid.UUID) -> Any:
    try:
        return await account_of(stub, patient_id)
    except GRPCError as error:
        if error.status is not Status.NOT_FOUND:
            raise
        return None


async def all_applied(stub: pb.BillingServiceStub, producer: AIOKafkaProducer, topic: str) -> None:
    """Returns once billing has applied everything published so far: it opens a sentinel
    account in every partition, after whatever was before it there."""
    sentinels = [registered() for _ in range(EVENT_PARTITIONS)]
    deliveries = [
        await producer.send(topic, msgspec.json.encode(s), partition=p)
        for p, s in enumerate(sentinels)
    ]
    for delivery in deliveries:
        await delivery
    for sentinel in sentinels:
        await eventually(lambda s=sentinel: has_account(stub, s.aggregate_id))


async def topic_size(settings: Settings, topic: str) -> int:
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(EVENT_PARTITIONS)]
        consumer.assign(partitions)
        return sum((await consumer.end_offsets(partitions)).values())
    finally:
        await consumer.stop()


async def test_a_patient_registered_through_the_command_api_gets_an_account(
    settings: Settings, store: EventStore, tokens: TestTokens, stub
):
    kafka = reliable_producer(settings)
    await kafka.start()
    source = EventStoreLog(store, settings.database_url, topic_prefix=settings.topic_prefix)
    await ensure_topics(settings, source.topics)
    relay = Publisher(source, kafka)
    relaying = asyncio.create_task(relay.run())
    try:
        app = create_app(settings, store, verifier=tokens.verifier)
        async with AsyncTestClient(app=app) as client:
            client.headers.update(tokens.headers(Role.RECEPTIONIST))
            response = await client.post("/patients", json=body())
            assert response.status_code == 201, response.text
            patient_id = uuid.UUID(response.json()["id"])
            account = await eventually(lambda: has_account(stub, patient_id), timeout=30)
            assert account.account_id == str(account_id_for(patient_id))
            assert account.status == pb.AccountStatus.OPEN

            removed_ = await client.delete(f"/patients/{patient_id}")
            assert removed_.status_code in (200, 204), removed_.text

            async def closed() -> bool:
                return (await account_of(stub, patient_id)).status == pb.AccountStatus.CLOSED

            await eventually(closed, timeout=30)
    finally:
        relay.stop()
        await relaying
        await kafka.stop()
    assert len(await accounts_of(settings.database_url, patient_id)) == 1


async def test_creates_racing_the_event_make_one_account(stub, producer, patients_topic, settings):
    event = registered()
    patient_id = event.aggregate_id
    request = pb.CreateBillingAccountRequest(
        patient_id=str(patient_id), name="Mary Seacole", email="mary@example.org"
    )

    async def create() -> str | None:
        """The account a create answers, or None when it came before the event."""
        try:
            return (await stub.create_billing_account(request)).account_id
        except GRPCError as error:
            if error.status is not Status.NOT_FOUND:
                raise
            return None

    answers = await asyncio.gather(
        publish(producer, patients_topic, event), *(create() for _ in range(10))
    )
    assert set(answers[1:]) <= {str(account_id_for(patient_id)), None}
    assert await eventually(create) == str(account_id_for(patient_id))
    await all_applied(stub, producer, patients_topic)
    assert len(await accounts_of(settings.database_url, patient_id)) == 1
    assert await outbox_types(settings.database_url, account_id_for(patient_id)) == [
        "BillingAccountOpened"
    ]


async def test_redelivered_events_change_nothing_twice(stub, producer, patients_topic, settings):
    event = registered()
    patient_id = event.aggregate_id
    await publish(producer, patients_topic, event, event, event)
    await eventually(lambda: has_account(stub, patient_id))
    await publish(producer, patients_topic, removed(patient_id), removed(patient_id), event)
    await all_applied(stub, producer, patients_topic)
    account = await account_of(stub, patient_id)
    assert account.status == pb.AccountStatus.CLOSED
    assert account.closed_at is not None
    assert len(await accounts_of(settings.database_url, patient_id)) == 1
    assert await outbox_types(settings.database_url, account_id_for(patient_id)) == [
        "BillingAccountOpened",
        "BillingAccountClosed",
    ]


async def test_a_removed_patients_account_is_kept_and_takes_no_payment(
    stub, producer, patients_topic
):
    event = registered()
    await publish(producer, patients_topic, event)
    account = await eventually(lambda: has_account(stub, event.aggregate_id))
    await stub.create_invoice(
        pb.CreateInvoiceRequest(
            account_id=account.account_id,
            currency_code=account.currency_code,
            lines=[pb.InvoiceLine(description="Visit", quantity=1, unit_amount_minor=2500)],
        )
    )
    await publish(producer, patients_topic, removed(event.aggregate_id))

    async def closed() -> pb.BillingAccount | None:
        got = await account_of(stub, event.aggregate_id)
        return got if got.status == pb.AccountStatus.CLOSED else None

    kept = await eventually(closed)
    assert kept.balance.amount_minor == 2500
    with pytest.raises(GRPCError) as refused:
        await stub.record_payment(
            pb.RecordPaymentRequest(
                account_id=account.account_id,
                amount=pb.Money(currency_code=account.currency_code, amount_minor=2500),
            )
        )
    assert refused.value.status is Status.FAILED_PRECONDITION


async def test_replaying_the_whole_topic_opens_nothing_new(
    stub, producer, patients_topic, settings
):
    for _ in range(5):
        await publish(producer, patients_topic, registered())
    await all_applied(stub, producer, patients_topic)

    async def counts() -> tuple[int, int]:
        async with await psycopg.AsyncConnection.connect(settings.database_url) as db:
            row = await (
                await db.execute(
                    "SELECT (SELECT count(*) FROM billing.accounts),"
                    " (SELECT count(*) FROM billing.outbox)"
                )
            ).fetchone()
        assert row is not None
        return row[0], row[1]

    before = await counts()
    size = await topic_size(settings, patients_topic)
    everything = await read_topic(settings, patients_topic, size)
    assert len(everything) == size >= before[0]
    deliveries = [
        await producer.send(patients_topic, r.value, key=r.key, partition=r.partition)
        for r in everything
    ]
    for delivery in deliveries:
        await delivery
    await all_applied(stub, producer, patients_topic)
    after = await counts()
    sentinels = EVENT_PARTITIONS  # all_applied opened one account (and event) per partition
    assert after == (before[0] + sentinels, before[1] + sentinels)


async def test_poison_messages_are_dead_lettered_and_the_consumer_carries_on(
    stub, producer, patients_topic, settings
):
    stranger = uuid.uuid4()
    unknown_type = msgspec.json.encode(registered()).replace(
        b'"PatientRegistered"', b'"PatientTeleported"'
    )
    poison = [b"{not json", unknown_type, msgspec.json.encode(removed(stranger))]
    for message in poison:
        await producer.send_and_wait(patients_topic, message, key=str(stranger).encode())
    after = registered(stranger)
    await publish(producer, patients_topic, after)
    await eventually(lambda: has_account(stub, stranger))

    dead = await read_topic(settings, f"{patients_topic}.dlq.carelog-billing", len(poison))
    bodies = [r.value for r in dead]
    assert b"{not json" in bodies
    assert unknown_type in bodies
    assert any(b"PatientRemoved" in b and str(stranger).encode() in b for b in bodies)
    assert all(dict(r.headers).get("error") for r in dead)


async def test_billing_events_are_published_in_order_without_personal_data(
    stub, producer, patients_topic, settings, tokens: TestTokens
):
    event = registered()
    await publish(producer, patients_topic, event)
    account = await eventually(lambda: has_account(stub, event.aggregate_id))
    issued = await stub.create_invoice(
        pb.CreateInvoiceRequest(
            account_id=account.account_id,
            currency_code=account.currency_code,
            lines=[pb.InvoiceLine(description="Physiotherapy", quantity=2, unit_amount_minor=4500)],
        ),
        metadata={**bearer(tokens), "x-correlation-id": "corr-billing-1"},
    )
    await stub.record_payment(
        pb.RecordPaymentRequest(
            account_id=account.account_id,
            amount=pb.Money(currency_code=account.currency_code, amount_minor=5000),
        )
    )
    account_id = uuid.UUID(account.account_id)

    async def all_marked() -> int:
        """How many events the outbox holds, once all of this account's are published."""
        async with await psycopg.AsyncConnection.connect(settings.database_url) as db:
            row = await (
                await db.execute(
                    "SELECT count(*) FILTER (WHERE aggregate_id = %s AND published_at IS NULL),"
                    " count(*) FROM billing.outbox",
                    [account_id],
                )
            ).fetchone()
        assert row is not None
        return row[1] if row[0] == 0 else 0

    total = await eventually(all_marked)
    everything = await read_topic(settings, settings.topic(BILLING_STREAM), total)
    key = account.account_id.encode()
    records = [r for r in everything if r.key == key]
    decoded = [decode_billing_event(r.value) for r in records]
    assert [(e.type, e.aggregate_version) for e, _ in decoded] == [
        ("BillingAccountOpened", 1),
        ("InvoiceIssued", 2),
        ("PaymentRecorded", 3),
    ]
    assert len({r.partition for r in records}) == 1
    opened, invoice, payment = (data for _, data in decoded)
    assert opened.patient_id == event.aggregate_id
    assert decoded[0][0].correlation_id == event.correlation_id
    assert decoded[1][0].correlation_id == "corr-billing-1"
    assert invoice.invoice_id == uuid.UUID(issued.invoice.invoice_id)
    assert (invoice.total_minor, invoice.line_count, invoice.balance_minor) == (9000, 1, 9000)
    assert (payment.amount_minor, payment.balance_minor) == (5000, 4000)
    headers = dict(records[1].headers)
    assert headers["event-type"] == b"InvoiceIssued"
    assert headers["aggregate-id"] == key
    for record in records:
        assert event.data.email.encode() not in record.value
        assert event.data.name.encode() not in record.value
        assert b"Physiotherapy" not in record.value


async def test_billing_events_record_their_actor_the_caller_or_the_patient_events(
    stub, producer, patients_topic, settings, tokens: TestTokens
):
    receptionist = str(uuid.uuid4())
    event = msgspec.structs.replace(registered(), actor_id=receptionist, actor_role="receptionist")
    await publish(producer, patients_topic, event)
    account = await eventually(lambda: has_account(stub, event.aggregate_id))
    clerk = str(uuid.uuid4())
    await stub.create_invoice(
        pb.CreateInvoiceRequest(
            account_id=account.account_id,
            currency_code=account.currency_code,
            lines=[pb.InvoiceLine(description="Consultation", quantity=1, unit_amount_minor=5000)],
        ),
        metadata={"authorization": f"Bearer {tokens.token(Role.BILLING, subject=clerk)}"},
    )
    unattributed = registered()  # a patient event stored before actors were recorded
    await publish(producer, patients_topic, unattributed)
    await eventually(lambda: has_account(stub, unattributed.aggregate_id))

    async def actors(account_id: str) -> list[tuple[str, str, str]]:
        async with await psycopg.AsyncConnection.connect(settings.database_url) as db:
            cur = await db.execute(
                "SELECT type, actor_id, actor_role FROM billing.outbox WHERE aggregate_id = %s"
                " ORDER BY aggregate_version",
                [uuid.UUID(account_id)],
            )
            return list(await cur.fetchall())

    assert await actors(account.account_id) == [
        ("BillingAccountOpened", receptionist, "receptionist"),
        ("InvoiceIssued", clerk, "billing"),
    ]
    other = str(account_id_for(unattributed.aggregate_id))
    assert await actors(other) == [("BillingAccountOpened", "system:carelog-billing", "system")]

    async def published_count() -> int:
        async with await psycopg.AsyncConnection.connect(settings.database_url) as db:
            row = await (
                await db.execute(
                    "SELECT count(*) FILTER (WHERE aggregate_id = %s AND published_at IS NULL),"
                    " count(*) FROM billing.outbox",
                    [uuid.UUID(account.account_id)],
                )
            ).fetchone()
        assert row is not None
        return row[1] if row[0] == 0 else 0

    total = await eventually(published_count)
    everything = await read_topic(settings, settings.topic(BILLING_STREAM), total)
    mine = [r for r in everything if r.key == account.account_id.encode()]
    assert [decode_billing_event(r.value)[0].actor_id for r in mine] == [receptionist, clerk]
    assert [dict(r.headers)["actor-role"] for r in mine] == [b"receptionist", b"billing"]


async def test_a_batch_of_registrations_and_other_events_applies_in_its_order(
    billing: Running, settings: Settings
):
    """Registrations are opened many to a statement; the events between them still apply in
    the batch's order, and a patient registered twice in it gets one account."""
    service = Billing(billing.pool, SCHEMA, "GBP")
    a, b, c = registered(), registered(), registered()
    change = contracts.envelope(
        PatientDetailsChangedV1(
            name="Mary Seacole-Grant",
            email=f"changed-{uuid.uuid4().hex[:8]}@example.org",
            address="2 Kingston Road",
            date_of_birth=date(1985, 11, 23),
        ),
        aggregate_id=a.aggregate_id,
        aggregate_version=2,
        position=3,
        occurred_at=datetime.now(UTC),
    )
    envelopes = [a, b, change, a, removed(b.aggregate_id), c, c]
    batch = [contracts.decode(msgspec.json.encode(e)) for e in envelopes]

    applied = await service.apply_patient_events(batch)

    assert (applied.opened, applied.closed, applied.unchanged) == (3, 1, 3)
    async with await psycopg.AsyncConnection.connect(settings.database_url) as db:
        cur = await db.execute(
            f"SELECT email, patient_version FROM {SCHEMA}.accounts WHERE patient_id = %s",
            [a.aggregate_id],
        )
        # The registration delivered again after the change does not undo it.
        assert await cur.fetchall() == [(change.data.email, 2)]
    for patient, events in (
        (a, ["BillingAccountOpened"]),
        (b, ["BillingAccountOpened", "BillingAccountClosed"]),
        (c, ["BillingAccountOpened"]),
    ):
        assert len(await accounts_of(settings.database_url, patient.aggregate_id)) == 1
        assert await outbox_types(settings.database_url, account_id_for(patient.aggregate_id)) == (
            events
        )


def changed(patient_id: uuid.UUID, version: int, email: str) -> Any:
    return contracts.envelope(
        PatientDetailsChangedV1(
            name=f"Mary Seacole v{version}",
            email=email,
            address="2 Kingston Road",
            date_of_birth=date(1985, 11, 23),
        ),
        aggregate_id=patient_id,
        aggregate_version=version,
        position=version + 100,
        occurred_at=datetime.now(UTC),
    )


async def test_details_changes_in_a_row_apply_as_one_and_each_account_keeps_its_newest(
    billing: Running, settings: Settings
):
    """Consecutive changes go as one statement: a patient changed twice in the run keeps
    the newer (whichever came first), an old change delivered again changes nothing, and a
    change for a patient registered earlier in the batch finds the account opened."""
    service = Billing(billing.pool, SCHEMA, "GBP")
    a, b, c = registered(), registered(), registered()
    await service.apply_patient_events([contracts.decode(msgspec.json.encode(a))])
    await service.apply_patient_events([contracts.decode(msgspec.json.encode(b))])
    tag = uuid.uuid4().hex[:8]
    envelopes = [
        c,
        changed(a.aggregate_id, 3, f"a3-{tag}@example.org"),
        changed(a.aggregate_id, 2, f"a2-{tag}@example.org"),  # late: the newer one stays
        changed(b.aggregate_id, 2, f"b2-{tag}@example.org"),
        changed(c.aggregate_id, 2, f"c2-{tag}@example.org"),
        changed(b.aggregate_id, 3, f"b3-{tag}@example.org"),
    ]
    batch = [contracts.decode(msgspec.json.encode(e)) for e in envelopes]

    applied = await service.apply_patient_events(batch)

    assert (applied.opened, applied.closed, applied.unchanged) == (1, 0, 5)
    async with await psycopg.AsyncConnection.connect(settings.database_url) as db:
        for patient, want in ((a, ("a3", 3)), (b, ("b3", 3)), (c, ("c2", 2))):
            cur = await db.execute(
                f"SELECT email, patient_version FROM {SCHEMA}.accounts WHERE patient_id = %s",
                [patient.aggregate_id],
            )
            assert await cur.fetchall() == [(f"{want[0]}-{tag}@example.org", want[1])]


async def test_a_change_for_a_patient_without_an_account_can_never_apply(
    billing: Running, settings: Settings
):
    service = Billing(billing.pool, SCHEMA, "GBP")
    a = registered()
    await service.apply_patient_events([contracts.decode(msgspec.json.encode(a))])
    stranger = uuid.uuid4()
    batch = [
        contracts.decode(msgspec.json.encode(e))
        for e in (
            changed(a.aggregate_id, 2, "kept-out@example.org"),
            changed(stranger, 2, "nobody@example.org"),
        )
    ]
    with pytest.raises(UnappliableEvent, match="billing has no account"):
        await service.apply_patient_events(batch)
    async with await psycopg.AsyncConnection.connect(settings.database_url) as db:
        cur = await db.execute(
            f"SELECT patient_version FROM {SCHEMA}.accounts WHERE patient_id = %s",
            [a.aggregate_id],
        )
        assert await cur.fetchall() == [(1,)]  # the batch's transaction took nothing
