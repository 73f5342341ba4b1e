"""Billing rules: accounts, invoices and payments in exact money. No I/O happens here.

An account belongs to one patient (its id is derived from the patient's), holds
one currency, and keeps two running totals in minor units: what was invoiced and
what was paid. The balance is always their difference and never negative: a
payment may not exceed it. A closed account is kept for the records and takes no
new invoices or payments.

Each change returns the account's next state and the event that records it; the
events' published form (`billing.events`) is defined at the end of this module.
Personal data (a patient's name or email, an invoice line's description) never
goes into an event.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any, cast
from uuid import UUID, uuid5

import msgspec

from domain.contracts import Contract, Envelope, decode, json_schemas, publish
from domain.errors import DomainError, InvalidData
from domain.patients import _EMAIL, EMAIL_MAX, NAME_MAX

MAX_AMOUNT = 10**12
"""The most one invoice or one payment may be, in minor units."""
MAX_INVOICED = 10**17
"""The most an account may ever be invoiced in total: far inside a signed 64-bit integer."""
MAX_QUANTITY = 100_000
MAX_LINES = 100
DESCRIPTION_MAX = 200
REQUEST_ID_MAX = 100

_CURRENCY = re.compile(r"^[A-Z]{3}$")
_ACCOUNTS = UUID("3a0d6b0e-6f52-4d0f-8d7e-0c2b9b1f4a61")
_INVOICES = UUID("b5f6a0c1-2d7e-4e59-9d0a-6a1c3f8e2b47")
_PAYMENTS = UUID("e1c27f4d-8b3a-4c6e-a5f0-9d2b7e1a6c38")


class BillingError(DomainError):
    """Base class of billing's expected, client-caused failures."""


class AccountNotFound(BillingError):
    """No billing account has this id (or the patient has none)."""


class AccountClosed(BillingError):
    """The account is closed: it takes no new invoices or payments."""


class CurrencyMismatch(BillingError):
    """The amount is not in the account's currency."""


class Overpayment(BillingError):
    """The payment is more than the account's balance."""


class AccountLimitReached(BillingError):
    """The invoice would take the account's total past what it may hold."""


class RequestReused(BillingError):
    """An idempotency key was used before for a different request."""


class AccountStatus(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class Money:
    amount_minor: int
    currency: str


@dataclass(frozen=True)
class InvoiceLine:
    description: str
    quantity: int
    unit_amount_minor: int

    @property
    def amount_minor(self) -> int:
        return self.quantity * self.unit_amount_minor


@dataclass(frozen=True)
class Contact:
    """Who the account's bills go to. Personal data: kept in billing's state only."""

    name: str
    email: str


def account_id_for(patient_id: UUID) -> UUID:
    """The id of a patient's account: one patient, one id, wherever it is opened."""
    return uuid5(_ACCOUNTS, str(patient_id))


def invoice_id_for(account_id: UUID, request_id: str) -> UUID:
    """A retried request (same idempotency key) names the same invoice."""
    return uuid5(_INVOICES, f"{account_id}/{request_id}")


def payment_id_for(account_id: UUID, request_id: str) -> UUID:
    return uuid5(_PAYMENTS, f"{account_id}/{request_id}")


# --- Events --------------------------------------------------------------------------


class BillingAccountOpenedV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    patient_id: UUID
    currency: str
    opened_by: str
    """What opened it: `PatientRegistered` (the event) or `CreateBillingAccount` (a call)."""


class BillingAccountClosedV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    patient_id: UUID
    currency: str
    balance_minor: int
    """What was still owed when it closed."""


class InvoiceIssuedV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    """An invoice's totals; its lines' descriptions stay in billing (they may be clinical)."""

    invoice_id: UUID
    patient_id: UUID
    currency: str
    total_minor: int
    line_count: int
    balance_minor: int


class PaymentRecordedV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    payment_id: UUID
    patient_id: UUID
    currency: str
    amount_minor: int
    balance_minor: int


BillingEvent = BillingAccountOpenedV1 | BillingAccountClosedV1 | InvoiceIssuedV1 | PaymentRecordedV1

BILLING_STREAM = "billing.events"
AGGREGATE_TYPE = "BillingAccount"

BILLING_CONTRACTS: dict[type, Contract] = {
    payload: Contract(name, 1, payload, AGGREGATE_TYPE, BILLING_STREAM)
    for name, payload in (
        ("BillingAccountOpened", BillingAccountOpenedV1),
        ("BillingAccountClosed", BillingAccountClosedV1),
        ("InvoiceIssued", InvoiceIssuedV1),
        ("PaymentRecorded", PaymentRecordedV1),
    )
}
publish(BILLING_CONTRACTS.values())


def decode_billing_event(message: bytes) -> tuple[Envelope[msgspec.Raw], BillingEvent]:
    """Decodes a published billing event; raises msgspec.ValidationError or KeyError."""
    envelope, event = decode(message)
    if not isinstance(event, BillingEvent.__args__):
        raise KeyError(envelope.type)
    return envelope, cast(BillingEvent, event)


def billing_json_schemas() -> dict[str, dict[str, Any]]:
    """File name → JSON Schema of every published billing event."""
    return json_schemas(BILLING_CONTRACTS.values())


# --- The account ----------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    """A patient's billing account; every change answers (next state, event)."""

    id: UUID
    patient_id: UUID
    currency: str
    status: AccountStatus
    invoiced_minor: int
    paid_minor: int
    version: int
    opened_at: datetime
    closed_at: datetime | None = None

    @property
    def balance_minor(self) -> int:
        return self.invoiced_minor - self.paid_minor

    @property
    def is_open(self) -> bool:
        return self.status is AccountStatus.OPEN

    @classmethod
    def open(
        cls, patient_id: UUID, currency: str, opened_by: str, now: datetime
    ) -> tuple[Account, BillingAccountOpenedV1]:
        account = cls(
            id=account_id_for(patient_id),
            patient_id=patient_id,
            currency=currency,
            status=AccountStatus.OPEN,
            invoiced_minor=0,
            paid_minor=0,
            version=1,
            opened_at=now,
        )
        return account, BillingAccountOpenedV1(
            patient_id=patient_id, currency=currency, opened_by=opened_by
        )

    def close(self, now: datetime) -> tuple[Account, BillingAccountClosedV1] | None:
        """Closes an open account; None if it is closed already (closing twice changes nothing)."""
        if not self.is_open:
            return None
        closed = replace(self, status=AccountStatus.CLOSED, closed_at=now, version=self.version + 1)
        return closed, BillingAccountClosedV1(
            patient_id=self.patient_id, currency=self.currency, balance_minor=self.balance_minor
        )

    def issue_invoice(
        self, invoice_id: UUID, currency: str, lines: Sequence[InvoiceLine]
    ) -> tuple[Account, InvoiceIssuedV1]:
        """Adds an invoice (already parsed, so its total is within MAX_AMOUNT) to the balance."""
        self._accepts(currency)
        total = sum(line.amount_minor for line in lines)
        if self.invoiced_minor + total > MAX_INVOICED:
            raise AccountLimitReached(f"the account may be invoiced at most {MAX_INVOICED}")
        issued = replace(self, invoiced_minor=self.invoiced_minor + total, version=self.version + 1)
        return issued, InvoiceIssuedV1(
            invoice_id=invoice_id,
            patient_id=self.patient_id,
            currency=currency,
            total_minor=total,
            line_count=len(lines),
            balance_minor=issued.balance_minor,
        )

    def record_payment(self, payment_id: UUID, amount: Money) -> tuple[Account, PaymentRecordedV1]:
        """Takes a payment off the balance; Overpayment if it is more than the balance."""
        self._accepts(amount.currency)
        if amount.amount_minor > self.balance_minor:
            raise Overpayment(
                f"the payment ({amount.amount_minor}) is more than the balance"
                f" ({self.balance_minor} {self.currency})"
            )
        paid = replace(
            self, paid_minor=self.paid_minor + amount.amount_minor, version=self.version + 1
        )
        return paid, PaymentRecordedV1(
            payment_id=payment_id,
            patient_id=self.patient_id,
            currency=self.currency,
            amount_minor=amount.amount_minor,
            balance_minor=paid.balance_minor,
        )

    def _accepts(self, currency: str) -> None:
        if not self.is_open:
            raise AccountClosed("the account is closed")
        if currency != self.currency:
            raise CurrencyMismatch(f"the account is in {self.currency}, not {currency}")


# --- Parsing a client's input -----------------------------------------------------------
# Field names in errors are the API's (proto) field names, so a client can tell which
# field to fix; every wrong field is reported at once.


def parse_uuid(errors: dict[str, str], field: str, value: str) -> UUID | None:
    if not value:
        errors[field] = "is required"
        return None
    try:
        return UUID(value)
    except ValueError:
        errors[field] = "must be a UUID"
        return None


def parse_currency(errors: dict[str, str], field: str, value: str) -> str:
    if not value:
        errors[field] = "is required"
    elif not _CURRENCY.match(value):
        errors[field] = "must be an ISO 4217 code: three upper-case letters"
    return value


def parse_request_id(errors: dict[str, str], field: str, value: str) -> str | None:
    if not value:
        return None
    if len(value) > REQUEST_ID_MAX or not value.isprintable():
        errors[field] = f"must be at most {REQUEST_ID_MAX} printable characters"
    return value


def parse_contact(errors: dict[str, str], name: str, email: str) -> Contact:
    name, email = name.strip(), email.strip()
    if not name:
        errors["name"] = "is required"
    elif len(name) > NAME_MAX:
        errors["name"] = f"must be at most {NAME_MAX} characters"
    if not email:
        errors["email"] = "is required"
    elif len(email) > EMAIL_MAX or not _EMAIL.match(email):
        errors["email"] = "must be a valid email address"
    return Contact(name, email)


def parse_lines(
    errors: dict[str, str], field: str, raw: Sequence[tuple[str, int, int]]
) -> list[InvoiceLine]:
    """(description, quantity, unit amount) triples → invoice lines, with a positive total."""
    if not raw:
        errors[field] = "at least one line is required"
        return []
    if len(raw) > MAX_LINES:
        errors[field] = f"at most {MAX_LINES} lines"
        return []
    lines = []
    for i, (description, quantity, unit) in enumerate(raw):
        at = f"{field}[{i}]"
        text = description.strip()
        if not text:
            errors[f"{at}.description"] = "is required"
        elif len(text) > DESCRIPTION_MAX:
            errors[f"{at}.description"] = f"must be at most {DESCRIPTION_MAX} characters"
        if not 1 <= quantity <= MAX_QUANTITY:
            errors[f"{at}.quantity"] = f"must be from 1 to {MAX_QUANTITY}"
        if not 0 <= unit <= MAX_AMOUNT:
            errors[f"{at}.unit_amount_minor"] = f"must be from 0 to {MAX_AMOUNT}"
        lines.append(InvoiceLine(text, quantity, unit))
    if not any(key.startswith(f"{field}[") for key in errors):
        total = sum(line.amount_minor for line in lines)
        if not 1 <= total <= MAX_AMOUNT:
            errors[field] = f"the total must be from 1 to {MAX_AMOUNT} minor units"
    return lines


def parse_amount(errors: dict[str, str], field: str, amount: tuple[str, int] | None) -> Money:
    """(currency code, amount in minor units) → a positive Money."""
    if amount is None:
        errors[field] = "is required"
        return Money(0, "")
    currency = parse_currency(errors, f"{field}.currency_code", amount[0])
    if not 1 <= amount[1] <= MAX_AMOUNT:
        errors[f"{field}.amount_minor"] = f"must be from 1 to {MAX_AMOUNT}"
    return Money(amount[1], currency)


def check(errors: dict[str, str]) -> None:
    """Raises InvalidData if any field was wrong."""
    if errors:
        raise InvalidData(errors)
