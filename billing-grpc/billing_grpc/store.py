"""Billing's state in PostgreSQL (its own schema), and the outbox of `billing.events`.

Every change is one transaction that locks the account's row, writes the new state
and appends the event to the outbox. Constraints repeat the rules the domain keeps
(one account per patient, paid never above invoiced), so no path can break them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import msgspec
import psycopg
from psycopg import sql

from domain.billing import (
    BILLING_CONTRACTS,
    Account,
    AccountStatus,
    BillingEvent,
    Contact,
    InvoiceLine,
    Money,
)
from domain.events import Actor
from runtime.db import arrays, render_statements

_ACCOUNT_COLUMNS = (
    "id, patient_id, currency, status, invoiced_minor, paid_minor, version, opened_at, closed_at"
)


@dataclass(frozen=True)
class Invoice:
    id: UUID
    account_id: UUID
    currency: str
    lines: list[InvoiceLine]
    total_minor: int
    issued_at: datetime
    seq: int


@dataclass(frozen=True)
class Payment:
    id: UUID
    account_id: UUID
    amount: Money
    received_at: datetime


_lines_encoder = msgspec.json.Encoder()
_lines_decoder = msgspec.json.Decoder(list[tuple[str, int, int]])


SCHEMA = "billing"
"""The PostgreSQL schema of billing's tables (created by the migrations)."""


def _account(row: tuple[Any, ...]) -> Account:
    return Account(
        id=row[0],
        patient_id=row[1],
        currency=row[2],
        status=AccountStatus(row[3]),
        invoiced_minor=row[4],
        paid_minor=row[5],
        version=row[6],
        opened_at=row[7],
        closed_at=row[8],
    )


def _invoice(row: tuple[Any, ...]) -> Invoice:
    return Invoice(
        id=row[0],
        account_id=row[1],
        currency=row[2],
        lines=[InvoiceLine(*line) for line in _lines_decoder.decode(row[3].encode())],
        total_minor=row[4],
        issued_at=row[5],
        seq=row[6],
    )


class BillingStore:
    """The SQL of billing's state, for one schema; every method runs on a given cursor."""

    def __init__(self, schema: str):
        self.schema = schema
        s = sql.Identifier(schema)
        cols = sql.SQL(_ACCOUNT_COLUMNS)
        self._lock_by_id = sql.SQL("SELECT {} FROM {}.accounts WHERE id = %s FOR UPDATE").format(
            cols, s
        )
        self._lock_by_patient = sql.SQL(
            "SELECT {} FROM {}.accounts WHERE patient_id = %s FOR UPDATE"
        ).format(cols, s)
        self._by_patient = sql.SQL("SELECT {} FROM {}.accounts WHERE patient_id = %s").format(
            cols, s
        )
        self._by_id = sql.SQL("SELECT {} FROM {}.accounts WHERE id = %s").format(cols, s)
        self._page = sql.SQL(
            "SELECT {} FROM {}.accounts WHERE id > %s ORDER BY id LIMIT %s"
        ).format(cols, s)
        # The account and its first outbox row in one statement: the row only if the
        # account was inserted.
        self._insert_account = sql.SQL(
            "WITH opened AS (INSERT INTO {s}.accounts (id, patient_id, currency, status,"
            " invoiced_minor, paid_minor, version, name, email, patient_version, opened_by,"
            " registered_at, opened_at)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT DO NOTHING RETURNING id, version)"
            " INSERT INTO {s}.outbox (aggregate_id, aggregate_version, type, schema_version,"
            " payload, occurred_at, correlation_id, actor_id, actor_role)"
            " SELECT id, version, %s::text, %s::int, %s::bytea, %s::timestamptz, %s::text,"
            " %s::text, %s::text FROM opened RETURNING aggregate_id"
        ).format(s=s)
        # Many accounts and their first outbox rows in one statement (the events of a
        # batch): a row for each account inserted, in the order given.
        self._insert_accounts = sql.SQL(
            "WITH given AS (SELECT * FROM unnest(%s::uuid[], %s::uuid[], %s::text[], %s::text[],"
            " %s::bigint[], %s::text[], %s::text[], %s::bigint[], %s::timestamptz[],"
            " %s::timestamptz[], %s::text[], %s::int[], %s::bytea[], %s::text[], %s::text[],"
            " %s::text[]) WITH ORDINALITY AS g(id, patient_id, currency, status, version, name,"
            " email, patient_version, registered_at, opened_at, type, schema_version, payload,"
            " correlation_id, actor_id, actor_role, n)),"
            " opened AS (INSERT INTO {s}.accounts (id, patient_id, currency, status,"
            " invoiced_minor, paid_minor, version, name, email, patient_version, opened_by,"
            " registered_at, opened_at)"
            " SELECT id, patient_id, currency, status, 0, 0, version, name, email,"
            " patient_version, %s, registered_at, opened_at FROM given ORDER BY n"
            " ON CONFLICT DO NOTHING RETURNING id, version)"
            " INSERT INTO {s}.outbox (aggregate_id, aggregate_version, type, schema_version,"
            " payload, occurred_at, correlation_id, actor_id, actor_role)"
            " SELECT g.id, o.version, g.type, g.schema_version, g.payload, g.opened_at,"
            " g.correlation_id, g.actor_id, g.actor_role FROM opened o JOIN given g USING (id)"
            " ORDER BY g.n RETURNING aggregate_id"
        ).format(s=s)
        self._save = sql.SQL(
            "UPDATE {}.accounts SET status = %s, invoiced_minor = %s, paid_minor = %s,"
            " version = %s, closed_at = %s WHERE id = %s AND version = %s"
        ).format(s)
        self._contact = sql.SQL(
            "UPDATE {}.accounts SET name = %s, email = %s, patient_version = %s"
            " WHERE patient_id = %s AND patient_version < %s RETURNING id"
        ).format(s)
        # `update_contacts`: the newest version per patient in arrays; which patients have an
        # account comes back with whether it took the details.
        self._contacts = sql.SQL(
            "WITH g AS (SELECT * FROM unnest(%b::uuid[], %s::text[], %s::text[], %b::bigint[])"
            " AS g(patient_id, name, email, version)),"
            " u AS (UPDATE {s}.accounts a SET name = g.name, email = g.email,"
            " patient_version = g.version FROM g"
            " WHERE a.patient_id = g.patient_id AND a.patient_version < g.version"
            " RETURNING a.patient_id)"
            " SELECT a.patient_id FROM {s}.accounts a JOIN g ON a.patient_id = g.patient_id"
        ).format(s=s)
        self._erase_contact = sql.SQL(
            "UPDATE {}.accounts SET name = '', email = '' WHERE patient_id = %s"
        ).format(s)
        self._erase_lines = sql.SQL(
            "UPDATE {s}.invoices SET lines = (SELECT coalesce(jsonb_agg(jsonb_set(line, '{{0}}',"
            " '\"\"')), '[]'::jsonb) FROM jsonb_array_elements(lines) AS line)"
            " WHERE account_id = (SELECT id FROM {s}.accounts WHERE patient_id = %s)"
        ).format(s=s)
        invoice_cols = sql.SQL("id, account_id, currency, lines::text, total_minor, issued_at, seq")
        self._insert_invoice = sql.SQL(
            "INSERT INTO {}.invoices (id, account_id, currency, lines, total_minor, request_id,"
            " request_digest, issued_at) VALUES (%s, %s, %s, %s::jsonb, %s, %s, %s, %s)"
            " RETURNING seq"
        ).format(s)
        self._invoice_by_request = sql.SQL(
            "SELECT {}, request_digest FROM {}.invoices WHERE account_id = %s AND request_id = %s"
        ).format(invoice_cols, s)
        self._invoices = sql.SQL(
            "SELECT {} FROM {}.invoices WHERE account_id = %s AND seq > %s ORDER BY seq LIMIT %s"
        ).format(invoice_cols, s)
        self._insert_payment = sql.SQL(
            "INSERT INTO {}.payments (id, account_id, currency, amount_minor, request_id,"
            " request_digest, received_at) VALUES (%s, %s, %s, %s, %s, %s, %s)"
        ).format(s)
        self._payment_by_request = sql.SQL(
            "SELECT id, account_id, currency, amount_minor, received_at, request_digest"
            " FROM {}.payments WHERE account_id = %s AND request_id = %s"
        ).format(s)
        self._append = sql.SQL(
            "INSERT INTO {}.outbox (aggregate_id, aggregate_version, type, schema_version,"
            " payload, occurred_at, correlation_id, actor_id, actor_role)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(s)
        render_statements(self)

    # --- accounts

    async def lock(self, cur: psycopg.AsyncCursor[Any], account_id: UUID) -> Account | None:
        await cur.execute(self._lock_by_id, [account_id])
        row = await cur.fetchone()
        return _account(row) if row else None

    async def lock_of_patient(
        self, cur: psycopg.AsyncCursor[Any], patient_id: UUID
    ) -> Account | None:
        await cur.execute(self._lock_by_patient, [patient_id])
        row = await cur.fetchone()
        return _account(row) if row else None

    async def of_patient(self, cur: psycopg.AsyncCursor[Any], patient_id: UUID) -> Account | None:
        await cur.execute(self._by_patient, [patient_id])
        row = await cur.fetchone()
        return _account(row) if row else None

    async def get(self, cur: psycopg.AsyncCursor[Any], account_id: UUID) -> Account | None:
        await cur.execute(self._by_id, [account_id])
        row = await cur.fetchone()
        return _account(row) if row else None

    async def page(
        self, cur: psycopg.AsyncCursor[Any], after: UUID | None, limit: int
    ) -> list[Account]:
        await cur.execute(self._page, [after or UUID(int=0), limit])
        return [_account(row) for row in await cur.fetchall()]

    async def insert(
        self,
        cur: psycopg.AsyncCursor[Any],
        account: Account,
        contact: Contact,
        opened_by: str,
        registered_at: datetime | None,
        patient_version: int,
        event: BillingEvent,
        correlation_id: str | None,
        actor: Actor | None,
    ) -> bool:
        """Inserts a new account and appends the event that opened it (as `append` does),
        in one round trip; False if the patient has one already (nothing changes)."""
        await cur.execute(
            self._insert_account,
            [
                account.id,
                account.patient_id,
                account.currency,
                account.status.value,
                account.invoiced_minor,
                account.paid_minor,
                account.version,
                contact.name,
                contact.email,
                patient_version,
                opened_by,
                registered_at,
                account.opened_at,
                *self._outbox_row(event, account.opened_at, correlation_id, actor),
            ],
        )
        return await cur.fetchone() is not None

    async def insert_many(
        self, cur: psycopg.AsyncCursor[Any], opening: Sequence[Opening], opened_by: str
    ) -> set[UUID]:
        """`insert` for many new accounts (each with its first event, at its open time), in
        one round trip and one statement; returns the ids of the accounts inserted (none
        for a patient with an account already). A patient may be in `opening` once."""
        rows = [
            [
                o.account.id,
                o.account.patient_id,
                o.account.currency,
                o.account.status.value,
                o.account.version,
                o.contact.name,
                o.contact.email,
                o.patient_version,
                o.registered_at,
                o.account.opened_at,
                *_outbox_columns(o.event, o.correlation_id, o.actor),
            ]
            for o in opening
        ]
        await cur.execute(self._insert_accounts, [*arrays(rows), opened_by])
        return {row[0] for row in await cur.fetchall()}

    async def save(self, cur: psycopg.AsyncCursor[Any], account: Account, previous: int) -> None:
        """Writes a locked account's new state over version `previous`."""
        await cur.execute(
            self._save,
            [
                account.status.value,
                account.invoiced_minor,
                account.paid_minor,
                account.version,
                account.closed_at,
                account.id,
                previous,
            ],
        )
        if cur.rowcount != 1:
            raise RuntimeError(f"account {account.id} was not at version {previous}")

    async def update_contact(
        self, cur: psycopg.AsyncCursor[Any], patient_id: UUID, contact: Contact, version: int
    ) -> bool:
        """Keeps the newest contact details: False if the account has newer ones (or none)."""
        await cur.execute(
            self._contact, [contact.name, contact.email, version, patient_id, version]
        )
        return await cur.fetchone() is not None

    async def update_contacts(
        self, cur: psycopg.AsyncCursor[Any], changes: Sequence[tuple[UUID, Contact, int]]
    ) -> set[UUID]:
        """`update_contact` for many patients in one statement: each account keeps the
        newest of its contact details. Returns the patients that have an account."""
        newest: dict[UUID, tuple[UUID, Contact, int]] = {}
        for change in changes:  # a statement changes a row once: a patient's newest wins
            if change[0] not in newest or newest[change[0]][2] < change[2]:
                newest[change[0]] = change
        rows = [(patient, c.name, c.email, version) for patient, c, version in newest.values()]
        await cur.execute(self._contacts, arrays(rows))
        return {row[0] for row in await cur.fetchall()}

    async def erase_patient(self, cur: psycopg.AsyncCursor[Any], patient_id: UUID) -> None:
        """Blanks what billing holds of an erased patient: the account's name and email and
        the descriptions of its invoice lines (which may be clinical). Amounts stay."""
        await cur.execute(self._erase_contact, [patient_id])
        await cur.execute(self._erase_lines, [patient_id])

    # --- invoices and payments

    async def insert_invoice(
        self,
        cur: psycopg.AsyncCursor[Any],
        invoice: Invoice,
        request_id: str | None,
        digest: str | None,
    ) -> Invoice:
        lines = [(x.description, x.quantity, x.unit_amount_minor) for x in invoice.lines]
        await cur.execute(
            self._insert_invoice,
            [
                invoice.id,
                invoice.account_id,
                invoice.currency,
                _lines_encoder.encode(lines).decode(),
                invoice.total_minor,
                request_id,
                digest,
                invoice.issued_at,
            ],
        )
        row = await cur.fetchone()
        assert row is not None
        return Invoice(**{**invoice.__dict__, "seq": row[0]})

    async def invoice_by_request(
        self, cur: psycopg.AsyncCursor[Any], account_id: UUID, request_id: str
    ) -> tuple[Invoice, str] | None:
        await cur.execute(self._invoice_by_request, [account_id, request_id])
        row = await cur.fetchone()
        return (_invoice(row), row[7]) if row else None

    async def invoices(
        self, cur: psycopg.AsyncCursor[Any], account_id: UUID, after: int, limit: int
    ) -> list[Invoice]:
        await cur.execute(self._invoices, [account_id, after, limit])
        return [_invoice(row) for row in await cur.fetchall()]

    async def insert_payment(
        self,
        cur: psycopg.AsyncCursor[Any],
        payment: Payment,
        request_id: str | None,
        digest: str | None,
    ) -> None:
        await cur.execute(
            self._insert_payment,
            [
                payment.id,
                payment.account_id,
                payment.amount.currency,
                payment.amount.amount_minor,
                request_id,
                digest,
                payment.received_at,
            ],
        )

    async def payment_by_request(
        self, cur: psycopg.AsyncCursor[Any], account_id: UUID, request_id: str
    ) -> tuple[Payment, str] | None:
        await cur.execute(self._payment_by_request, [account_id, request_id])
        row = await cur.fetchone()
        if row is None:
            return None
        return Payment(row[0], row[1], Money(row[3], row[2]), row[4]), row[5]

    # --- the outbox

    async def append(
        self,
        cur: psycopg.AsyncCursor[Any],
        account: Account,
        event: BillingEvent,
        occurred_at: datetime,
        correlation_id: str | None,
        actor: Actor | None,
    ) -> None:
        """Appends the event that made `account` (at its new version) to the outbox, with
        who caused it."""
        await cur.execute(
            self._append,
            [
                account.id,
                account.version,
                *self._outbox_row(event, occurred_at, correlation_id, actor),
            ],
        )

    @staticmethod
    def _outbox_row(
        event: BillingEvent, occurred_at: datetime, correlation_id: str | None, actor: Actor | None
    ) -> list[Any]:
        """An outbox row's columns after its aggregate id and version."""
        type_, version, payload, *who = _outbox_columns(event, correlation_id, actor)
        return [type_, version, payload, occurred_at, *who]


def _outbox_columns(
    event: BillingEvent, correlation_id: str | None, actor: Actor | None
) -> list[Any]:
    """An outbox row's type, schema version, payload, correlation id and actor."""
    contract = BILLING_CONTRACTS[type(event)]
    return [
        contract.type,
        contract.version,
        msgspec.json.encode(event),
        correlation_id,
        actor.user_id if actor else None,
        actor.role if actor else None,
    ]


@dataclass(frozen=True)
class Opening:
    """A new account to insert with the event that opened it (`Store.insert_many`)."""

    account: Account
    contact: Contact
    event: BillingEvent
    registered_at: datetime | None
    patient_version: int
    correlation_id: str | None
    actor: Actor | None
