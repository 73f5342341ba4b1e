"""Billing's money rules, without I/O: the balance is always invoiced minus paid, never
negative; closed accounts take nothing; every wrong field is named."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import msgspec
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from domain.billing import (
    BILLING_CONTRACTS,
    MAX_AMOUNT,
    Account,
    AccountClosed,
    AccountStatus,
    BillingAccountClosedV1,
    BillingAccountOpenedV1,
    CurrencyMismatch,
    InvoiceIssuedV1,
    InvoiceLine,
    Money,
    Overpayment,
    PaymentRecordedV1,
    account_id_for,
    billing_json_schemas,
    check,
    decode_billing_event,
    parse_amount,
    parse_contact,
    parse_lines,
    parse_uuid,
)
from domain.contracts import Envelope
from domain.errors import InvalidData

NOW = datetime(2026, 6, 15, 9, 30, tzinfo=UTC)


def opened(currency: str = "GBP") -> Account:
    return Account.open(uuid.uuid4(), currency, "CreateBillingAccount", NOW)[0]


def one_line(amount: int) -> list[InvoiceLine]:
    return [InvoiceLine("Consultation", 1, amount)]


def test_an_account_opens_empty_with_an_id_derived_from_the_patient():
    patient_id = uuid.uuid4()
    account, event = Account.open(patient_id, "GBP", "PatientRegistered", NOW)
    assert account.id == account_id_for(patient_id) != account_id_for(uuid.uuid4())
    assert (account.balance_minor, account.version, account.status) == (0, 1, AccountStatus.OPEN)
    assert event == BillingAccountOpenedV1(
        patient_id=patient_id, currency="GBP", opened_by="PatientRegistered"
    )


def test_invoice_then_payment():
    account = opened()
    account, issued = account.issue_invoice(
        uuid.uuid4(), "GBP", [InvoiceLine("Visit", 2, 3000), InvoiceLine("Test", 1, 450)]
    )
    assert (issued.total_minor, issued.line_count, issued.balance_minor) == (6450, 2, 6450)
    account, paid = account.record_payment(uuid.uuid4(), Money(6000, "GBP"))
    assert (paid.amount_minor, paid.balance_minor) == (6000, 450)
    assert (account.invoiced_minor, account.paid_minor, account.version) == (6450, 6000, 3)


def test_paying_more_than_the_balance_is_refused():
    account, _ = opened().issue_invoice(uuid.uuid4(), "GBP", one_line(100))
    with pytest.raises(Overpayment):
        account.record_payment(uuid.uuid4(), Money(101, "GBP"))
    with pytest.raises(Overpayment):
        opened().record_payment(uuid.uuid4(), Money(1, "GBP"))


def test_another_currency_is_refused():
    account = opened("EUR")
    with pytest.raises(CurrencyMismatch):
        account.issue_invoice(uuid.uuid4(), "GBP", one_line(100))


def test_a_closed_account_takes_nothing_and_closing_twice_changes_nothing():
    account, _ = opened().issue_invoice(uuid.uuid4(), "GBP", one_line(500))
    change = account.close(NOW)
    assert change is not None
    closed, event = change
    assert event == BillingAccountClosedV1(
        patient_id=account.patient_id, currency="GBP", balance_minor=500
    )
    assert (closed.status, closed.closed_at, closed.balance_minor) == (
        AccountStatus.CLOSED,
        NOW,
        500,
    )
    assert closed.close(NOW) is None
    with pytest.raises(AccountClosed):
        closed.issue_invoice(uuid.uuid4(), "GBP", one_line(1))
    with pytest.raises(AccountClosed):
        closed.record_payment(uuid.uuid4(), Money(1, "GBP"))


def test_every_wrong_line_field_is_named():
    errors: dict[str, str] = {}
    parse_lines(errors, "lines", [("ok", 1, 5), ("", 0, -1), ("x" * 201, 1, MAX_AMOUNT + 1)])
    assert set(errors) == {
        "lines[1].description",
        "lines[1].quantity",
        "lines[1].unit_amount_minor",
        "lines[2].description",
        "lines[2].unit_amount_minor",
    }


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ([], "lines"),
        ([("free", 1, 0)], "lines"),
        ([("big", 100_000, MAX_AMOUNT)], "lines"),
    ],
)
def test_an_invoice_needs_lines_with_a_total_in_range(raw, field):
    errors: dict[str, str] = {}
    parse_lines(errors, "lines", raw)
    assert field in errors


def test_amounts_contacts_and_ids_are_checked():
    errors: dict[str, str] = {}
    parse_amount(errors, "amount", ("gbp", 0))
    parse_contact(errors, " ", "not-an-email")
    parse_uuid(errors, "account_id", "123")
    assert set(errors) == {
        "amount.currency_code",
        "amount.amount_minor",
        "name",
        "email",
        "account_id",
    }
    with pytest.raises(InvalidData) as invalid:
        check(errors)
    assert "amount.currency_code:" in str(invalid.value)
    check({})  # nothing wrong: nothing raised


class AccountMachine(RuleBasedStateMachine):
    """Any sequence of invoices, payments (some too big) and a closing keeps the books right."""

    def __init__(self) -> None:
        super().__init__()
        self.account = opened()
        self.invoices: list[int] = []
        self.payments: list[int] = []
        self.changes = 0

    @rule(amounts=st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=5))
    def invoice(self, amounts: list[int]) -> None:
        lines = [InvoiceLine("item", 1, a) for a in amounts]
        if sum(amounts) == 0:
            return  # parsing refuses a zero total before the account sees it
        try:
            self.account, event = self.account.issue_invoice(uuid.uuid4(), "GBP", lines)
        except AccountClosed:
            assert self.account.status is AccountStatus.CLOSED
            return
        self.invoices.append(event.total_minor)
        self.changes += 1

    @rule(amount=st.integers(min_value=1, max_value=3 * 10**9))
    def pay(self, amount: int) -> None:
        before = self.account
        try:
            self.account, event = self.account.record_payment(uuid.uuid4(), Money(amount, "GBP"))
        except Overpayment:
            assert amount > before.balance_minor
            assert self.account == before
            return
        except AccountClosed:
            assert before.status is AccountStatus.CLOSED
            return
        self.payments.append(amount)
        self.changes += 1
        assert event.balance_minor == self.account.balance_minor

    @precondition(lambda self: self.account.is_open)
    @rule()
    def close(self) -> None:
        change = self.account.close(NOW)
        assert change is not None
        self.account = change[0]
        self.changes += 1

    @invariant()
    def balance_is_invoices_minus_payments(self) -> None:
        assert self.account.balance_minor == sum(self.invoices) - sum(self.payments)
        assert self.account.balance_minor >= 0
        assert self.account.version == 1 + self.changes


TestAccountMachine = AccountMachine.TestCase


def test_every_billing_event_round_trips_through_its_envelope():
    patient_id = uuid.uuid4()
    events = [
        BillingAccountOpenedV1(patient_id=patient_id, currency="GBP", opened_by="x"),
        InvoiceIssuedV1(
            invoice_id=uuid.uuid4(),
            patient_id=patient_id,
            currency="GBP",
            total_minor=10,
            line_count=1,
            balance_minor=10,
        ),
        PaymentRecordedV1(
            payment_id=uuid.uuid4(),
            patient_id=patient_id,
            currency="GBP",
            amount_minor=4,
            balance_minor=6,
        ),
        BillingAccountClosedV1(patient_id=patient_id, currency="GBP", balance_minor=6),
    ]
    assert {type(e) for e in events} == set(BILLING_CONTRACTS)
    for version, event in enumerate(events, start=1):
        contract = BILLING_CONTRACTS[type(event)]
        envelope = Envelope(
            event_id=uuid.uuid4(),
            type=contract.type,
            schema_version=contract.version,
            aggregate_type=contract.aggregate_type,
            aggregate_id=account_id_for(patient_id),
            aggregate_version=version,
            position=version,
            occurred_at=NOW,
            data=msgspec.Raw(msgspec.json.encode(event)),
        )
        decoded, data = decode_billing_event(msgspec.json.encode(envelope))
        assert data == event
        assert decoded.type == contract.type
        wire = json.loads(msgspec.json.encode(envelope))
        assert "patientId" in wire["data"]


def test_the_billing_schemas_describe_each_event():
    schemas = billing_json_schemas()
    assert set(schemas) == {f"billing.events/{c.type}.v1.json" for c in BILLING_CONTRACTS.values()}
    invoice = schemas["billing.events/InvoiceIssued.v1.json"]["$defs"]["InvoiceIssuedV1"]
    assert set(invoice["required"]) == {
        "invoiceId",
        "patientId",
        "currency",
        "totalMinor",
        "lineCount",
        "balanceMinor",
    }
