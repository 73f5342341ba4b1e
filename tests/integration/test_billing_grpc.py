"""Billing's gRPC API against the real PostgreSQL and Kafka: accounts, invoices, payments,
errors and deadlines, as a grpclib client with a billing-role token sees them.

Accounts open when billing sees a patient registered, so each test registers its
patients on the patient topic first (who may call what: test_billing_access.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest
from grpclib import GRPCError
from grpclib.const import Status
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from billing_grpc.generated.carelog.billing import v1 as pb
from domain.billing import account_id_for
from runtime.settings import Settings
from tests.support.billing import (
    accounts_of,
    billing,
    outbox_types,
    producer,
    register,
    stub,
)
from tests.support.stack import eventually

pytestmark = pytest.mark.integration

__all__ = ["billing", "producer", "stub"]  # fixtures

Opener = Callable[[], Awaitable[pb.BillingAccount]]


@pytest.fixture(scope="module")
def open_account(stub, producer, settings: Settings) -> Opener:
    """Registers a new patient and returns the account billing opened for them."""

    async def opened() -> pb.BillingAccount:
        return await register(stub, producer, settings)

    return opened


def lines(*amounts: int) -> list[pb.InvoiceLine]:
    return [
        pb.InvoiceLine(description=f"item {i}", quantity=1, unit_amount_minor=a)
        for i, a in enumerate(amounts)
    ]


async def invoice(
    stub: pb.BillingServiceStub, account_id: str, *amounts: int, currency: str = "GBP", **extra: Any
) -> pb.CreateInvoiceResponse:
    return await stub.create_invoice(
        pb.CreateInvoiceRequest(
            account_id=account_id, currency_code=currency, lines=lines(*amounts), **extra
        )
    )


async def pay(
    stub: pb.BillingServiceStub, account_id: str, amount: int, currency: str = "GBP", **extra: Any
) -> pb.RecordPaymentResponse:
    return await stub.record_payment(
        pb.RecordPaymentRequest(
            account_id=account_id,
            amount=pb.Money(currency_code=currency, amount_minor=amount),
            **extra,
        )
    )


async def refused(call: Any) -> GRPCError:
    with pytest.raises(GRPCError) as caught:
        await call
    return caught.value


# --- Accounts -------------------------------------------------------------------------


async def test_create_answers_the_seeds_shape_and_get_finds_it(stub, producer, settings):
    patient_id = uuid.uuid4()
    await register(stub, producer, settings, patient_id)
    response = await stub.create_billing_account(
        pb.CreateBillingAccountRequest(
            patient_id=str(patient_id), name="Ada Lovelace", email="ada@example.org"
        )
    )
    assert response.account_id == str(account_id_for(patient_id))
    assert response.status == "ACTIVE"
    got = await stub.get_billing_account(pb.GetBillingAccountRequest(patient_id=str(patient_id)))
    assert got.account_id == response.account_id
    assert got.status == pb.AccountStatus.OPEN
    assert got.currency_code == "GBP"
    assert got.balance == pb.Money(currency_code="GBP", amount_minor=0)
    assert got.opened_at is not None
    assert got.closed_at is None


async def test_a_repeated_create_answers_the_existing_account(stub, open_account, settings):
    first = await open_account()
    for name, currency in (("Another Name", ""), ("Yet Another", "EUR")):
        again = await stub.create_billing_account(
            pb.CreateBillingAccountRequest(
                patient_id=first.patient_id,
                name=name,
                email="other@example.org",
                currency_code=currency,
            )
        )
        assert again.account_id == first.account_id
        assert again.account.currency_code == "GBP"  # as opened at registration
    assert len(await accounts_of(settings.database_url, uuid.UUID(first.patient_id))) == 1
    assert await outbox_types(settings.database_url, uuid.UUID(first.account_id)) == [
        "BillingAccountOpened"
    ]


async def test_twenty_racing_creates_answer_one_account_and_add_no_event(
    stub, open_account, settings
):
    account = await open_account()
    patient_id = uuid.UUID(account.patient_id)
    request = pb.CreateBillingAccountRequest(
        patient_id=str(patient_id), name="Grace Hopper", email="grace@example.org"
    )
    answers = await asyncio.gather(*(stub.create_billing_account(request) for _ in range(20)))
    assert {a.account_id for a in answers} == {str(account_id_for(patient_id))}
    assert len(await accounts_of(settings.database_url, patient_id)) == 1
    assert await outbox_types(settings.database_url, account_id_for(patient_id)) == [
        "BillingAccountOpened"
    ]


async def test_no_account_opens_for_a_patient_billing_never_saw_registered(stub, settings):
    stranger = uuid.uuid4()
    request = pb.CreateBillingAccountRequest(
        patient_id=str(stranger), name="Ada Lovelace", email="ada@example.org"
    )
    for _ in range(2):
        error = await refused(stub.create_billing_account(request))
        assert error.status is Status.NOT_FOUND
        assert "registered" in (error.message or "")
    assert await accounts_of(settings.database_url, stranger) == []
    assert await outbox_types(settings.database_url, account_id_for(stranger)) == []
    error = await refused(
        stub.get_billing_account(pb.GetBillingAccountRequest(patient_id=str(stranger)))
    )
    assert error.status is Status.NOT_FOUND


async def test_list_pages_through_every_account_once_in_order(stub, open_account):
    mine = {(await open_account()).account_id for _ in range(5)}
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.list_billing_accounts(
            pb.ListBillingAccountsRequest(page_size=2, page_token=token)
        )
        assert len(page.accounts) <= 2
        seen.extend(a.account_id for a in page.accounts)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen))
    assert seen == sorted(seen, key=uuid.UUID)
    assert mine <= set(seen)


# --- Money -----------------------------------------------------------------------------


async def test_invoices_and_payments_move_the_balance(stub, open_account):
    account = await open_account()
    issued = await stub.create_invoice(
        pb.CreateInvoiceRequest(
            account_id=account.account_id,
            currency_code="GBP",
            lines=[
                pb.InvoiceLine(description="Consultation", quantity=1, unit_amount_minor=6000),
                pb.InvoiceLine(description="Blood test", quantity=3, unit_amount_minor=1250),
            ],
        )
    )
    assert issued.invoice.total == pb.Money(currency_code="GBP", amount_minor=9750)
    assert [(x.description, x.quantity) for x in issued.invoice.lines] == [
        ("Consultation", 1),
        ("Blood test", 3),
    ]
    assert issued.account.balance.amount_minor == 9750
    paid = await pay(stub, account.account_id, 4000)
    assert paid.payment.amount.amount_minor == 4000
    assert paid.account.balance.amount_minor == 5750
    assert paid.account.invoiced.amount_minor == 9750
    assert paid.account.paid.amount_minor == 4000
    exact = await pay(stub, account.account_id, 5750)
    assert exact.account.balance.amount_minor == 0


async def test_overpaying_is_refused_and_changes_nothing(stub, open_account):
    account = await open_account()
    await invoice(stub, account.account_id, 1000)
    error = await refused(pay(stub, account.account_id, 1001))
    assert error.status is Status.FAILED_PRECONDITION
    assert "balance" in (error.message or "")
    got = await stub.get_billing_account(pb.GetBillingAccountRequest(patient_id=account.patient_id))
    assert got.balance.amount_minor == 1000
    assert got.paid.amount_minor == 0


async def test_an_amount_in_another_currency_is_refused(stub, open_account):
    account = await open_account()
    error = await refused(invoice(stub, account.account_id, 500, currency="EUR"))
    assert error.status is Status.FAILED_PRECONDITION
    assert "GBP" in (error.message or "")


async def test_a_retried_invoice_or_payment_counts_once(stub, open_account):
    account = await open_account()
    first = await invoice(stub, account.account_id, 700, request_id="inv-1")
    again = await invoice(stub, account.account_id, 700, request_id="inv-1")
    assert again.invoice.invoice_id == first.invoice.invoice_id
    assert again.account.balance.amount_minor == 700
    paid = await pay(stub, account.account_id, 200, request_id="pay-1")
    repaid = await pay(stub, account.account_id, 200, request_id="pay-1")
    assert repaid.payment.payment_id == paid.payment.payment_id
    assert repaid.account.balance.amount_minor == 500


async def test_reusing_a_request_id_for_something_else_is_already_exists(stub, open_account):
    account = await open_account()
    await invoice(stub, account.account_id, 700, request_id="inv-1")
    error = await refused(invoice(stub, account.account_id, 701, request_id="inv-1"))
    assert error.status is Status.ALREADY_EXISTS
    await pay(stub, account.account_id, 100, request_id="pay-1")
    error = await refused(pay(stub, account.account_id, 101, request_id="pay-1"))
    assert error.status is Status.ALREADY_EXISTS


async def test_list_invoices_pages_oldest_first(stub, open_account):
    account = await open_account()
    for amount in (100, 200, 300, 400, 500):
        await invoice(stub, account.account_id, amount)
    totals: list[int] = []
    token = ""
    while True:
        page = await stub.list_invoices(
            pb.ListInvoicesRequest(account_id=account.account_id, page_size=2, page_token=token)
        )
        totals.extend(i.total.amount_minor for i in page.invoices)
        token = page.next_page_token
        if not token:
            break
    assert totals == [100, 200, 300, 400, 500]


SUMS = """
SELECT a.invoiced_minor, a.paid_minor,
  (SELECT coalesce(sum(total_minor), 0) FROM billing.invoices WHERE account_id = a.id),
  (SELECT coalesce(sum(amount_minor), 0) FROM billing.payments WHERE account_id = a.id)
FROM billing.accounts a WHERE a.id = %s
"""

operations = st.lists(
    st.tuples(st.sampled_from(["invoice", "pay"]), st.integers(min_value=1, max_value=50_000)),
    min_size=1,
    max_size=12,
)


@hypothesis_settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=operations)
async def test_any_sequence_of_invoices_and_payments_keeps_the_balance(
    stub, open_account, settings: Settings, steps: list[tuple[str, int]]
):
    account = await open_account()
    invoiced = paid = 0
    for kind, amount in steps:
        if kind == "invoice":
            response = await invoice(stub, account.account_id, amount)
            invoiced += amount
            balance = response.account.balance.amount_minor
        elif amount > invoiced - paid:
            error = await refused(pay(stub, account.account_id, amount))
            assert error.status is Status.FAILED_PRECONDITION
            balance = invoiced - paid
        else:
            balance = (await pay(stub, account.account_id, amount)).account.balance.amount_minor
            paid += amount
        assert balance == invoiced - paid >= 0
    async with await psycopg.AsyncConnection.connect(settings.database_url) as db:
        row = await (await db.execute(SUMS, [uuid.UUID(account.account_id)])).fetchone()
    assert row == (invoiced, paid, invoiced, paid)


# --- Errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"patient_id": "not-a-uuid"}, ["patient_id"]),
        ({"patient_id": "", "name": " ", "email": "nope"}, ["patient_id", "name", "email"]),
        ({"currency_code": "pounds"}, ["currency_code"]),
    ],
)
async def test_a_bad_create_is_invalid_argument_naming_each_field(stub, fields, named):
    request = pb.CreateBillingAccountRequest(
        patient_id=str(uuid.uuid4()), name="Ada", email="ada@example.org"
    )
    for key, value in fields.items():
        setattr(request, key, value)
    error = await refused(stub.create_billing_account(request))
    assert error.status is Status.INVALID_ARGUMENT
    for field in named:
        assert f"{field}:" in (error.message or "")


async def test_a_bad_invoice_names_each_wrong_line_field(stub, open_account):
    account = await open_account()
    error = await refused(
        stub.create_invoice(
            pb.CreateInvoiceRequest(
                account_id=account.account_id,
                currency_code="GBP",
                lines=[
                    pb.InvoiceLine(description="ok", quantity=1, unit_amount_minor=100),
                    pb.InvoiceLine(description="", quantity=0, unit_amount_minor=-5),
                ],
            )
        )
    )
    assert error.status is Status.INVALID_ARGUMENT
    message = error.message or ""
    for field in ("lines[1].description", "lines[1].quantity", "lines[1].unit_amount_minor"):
        assert field in message
    assert "lines[0]" not in message
    empty = await refused(invoice(stub, account.account_id))
    assert empty.status is Status.INVALID_ARGUMENT
    assert "lines:" in (empty.message or "")


async def test_a_payment_without_an_amount_or_with_a_negative_one_is_invalid(stub, open_account):
    account = await open_account()
    missing = await refused(
        stub.record_payment(pb.RecordPaymentRequest(account_id=account.account_id))
    )
    assert missing.status is Status.INVALID_ARGUMENT
    assert "amount:" in (missing.message or "")
    negative = await refused(pay(stub, account.account_id, -1))
    assert negative.status is Status.INVALID_ARGUMENT
    assert "amount.amount_minor" in (negative.message or "")


async def test_unknown_things_are_not_found(stub):
    nobody = str(uuid.uuid4())
    for call in (
        stub.create_billing_account(
            pb.CreateBillingAccountRequest(patient_id=nobody, name="Ada", email="ada@example.org")
        ),
        stub.get_billing_account(pb.GetBillingAccountRequest(patient_id=nobody)),
        invoice(stub, nobody, 100),
        pay(stub, nobody, 100),
        stub.list_invoices(pb.ListInvoicesRequest(account_id=nobody)),
    ):
        assert (await refused(call)).status is Status.NOT_FOUND


async def test_a_forged_page_token_is_invalid_argument(stub):
    for token in ("garbage", "YTpub3QtYS11dWlk", "aTp4"):
        error = await refused(
            stub.list_billing_accounts(pb.ListBillingAccountsRequest(page_token=token))
        )
        assert error.status is Status.INVALID_ARGUMENT
        assert "page_token" in (error.message or "")
    error = await refused(stub.list_billing_accounts(pb.ListBillingAccountsRequest(page_size=-1)))
    assert "page_size" in (error.message or "")


async def test_a_deadline_is_honoured_and_the_work_is_undone(stub, open_account, settings):
    account = await open_account()
    await invoice(stub, account.account_id, 1000)
    async with (
        await psycopg.AsyncConnection.connect(settings.database_url) as blocker,
        blocker.transaction(),
    ):
        # Hold the account's row, so the payment has to wait past its deadline.
        await blocker.execute(
            "SELECT 1 FROM billing.accounts WHERE id = %s FOR UPDATE",
            [uuid.UUID(account.account_id)],
        )
        started = time.monotonic()
        with pytest.raises((TimeoutError, GRPCError)) as caught:
            await stub.record_payment(
                pb.RecordPaymentRequest(
                    account_id=account.account_id,
                    amount=pb.Money(currency_code="GBP", amount_minor=300),
                ),
                timeout=0.5,
            )
        assert time.monotonic() - started < 3
        if isinstance(caught.value, GRPCError):
            assert caught.value.status is Status.DEADLINE_EXCEEDED

        async def nobody_waits_for_the_row() -> bool:
            row = await (await blocker.execute(WAITING)).fetchone()
            return row is not None and row[0] == 0

        # The server gave up the statement itself, while the row is still held.
        await eventually(nobody_waits_for_the_row, timeout=10)
    got = await stub.get_billing_account(pb.GetBillingAccountRequest(patient_id=account.patient_id))
    assert got.paid.amount_minor == 0
    assert got.balance.amount_minor == 1000
    after = await pay(stub, account.account_id, 300)
    assert after.account.balance.amount_minor == 700


WAITING = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND pid <> pg_backend_pid() AND wait_event_type = 'Lock'
"""


async def test_a_closed_account_refuses_invoices_and_payments(stub, open_account, settings):
    account = await open_account()
    await invoice(stub, account.account_id, 1000)
    async with await psycopg.AsyncConnection.connect(settings.database_url) as db:
        await db.execute(
            "UPDATE billing.accounts SET status = 'closed', closed_at = now() WHERE id = %s",
            [uuid.UUID(account.account_id)],
        )
        await db.commit()
    for call in (invoice(stub, account.account_id, 100), pay(stub, account.account_id, 100)):
        error = await refused(call)
        assert error.status is Status.FAILED_PRECONDITION
        assert "closed" in (error.message or "")
    again = await stub.create_billing_account(
        pb.CreateBillingAccountRequest(
            patient_id=account.patient_id, name="Ada", email="ada@example.org"
        )
    )
    assert again.status == "CLOSED"
    assert again.account.balance.amount_minor == 1000
