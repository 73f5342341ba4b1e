"""Billing's use cases: one method each, in one transaction (lock → decide → save + outbox).

The gRPC methods and the patient-event consumer both call these; neither decides
anything about money itself. Every event billing appends to its outbox records who
caused it: the gRPC caller (the token's user and role, set by `access.Gate` in
`domain.events.ACTOR`), or for what billing does on a patient event, that event's
actor (`system:carelog-billing` when the event recorded none).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import msgspec
from psycopg_pool import AsyncConnectionPool

from billing_grpc.store import BillingStore, Invoice, Opening, Payment
from domain.billing import (
    Account,
    AccountNotFound,
    Contact,
    InvoiceLine,
    Money,
    RequestReused,
    invoice_id_for,
    payment_id_for,
)
from domain.contracts import (
    Envelope,
    PatientDetailsChangedV1,
    PatientErasedV1,
    PatientRegisteredV2,
    PatientRegisteredV3,
    PatientRemovedV1,
    Unreadable,
)
from domain.errors import PatientNotFound
from domain.events import ACTOR, Actor, actor_of
from runtime.consumers import UnappliableEvent

CORRELATION_ID: ContextVar[str | None] = ContextVar("billing_correlation_id", default=None)
"""The current request's correlation id, kept with the events it causes."""
FINISH_BY: ContextVar[float | None] = ContextVar("billing_finish_by", default=None)
"""When the current request's deadline passes (time.monotonic()), if it has one."""

OPENED_BY_EVENT = "PatientRegistered"


@dataclass(frozen=True)
class Opened:
    account: Account
    created: bool
    """False when the patient had an account already: that one is answered."""


@dataclass(frozen=True)
class Applied:
    """What a batch of patient events did."""

    opened: int
    closed: int
    unchanged: int


def _cause_actor(envelope: Envelope[Any]) -> Actor:
    """Who caused what billing does on a patient event: the event's actor, else billing."""
    return actor_of(envelope.actor_id, envelope.actor_role, "carelog-billing")


def _now() -> datetime:
    return datetime.now(UTC)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(msgspec.json.encode(parts)).hexdigest()


class Billing:
    """Opens and closes accounts, issues invoices and records payments."""

    def __init__(self, pool: AsyncConnectionPool[Any], schema: str, default_currency: str):
        self.pool = pool
        self.store = BillingStore(schema)
        self.default_currency = default_currency

    async def account_of_registered(self, patient_id: UUID) -> Account:
        """The account billing opened when it saw the patient registered.

        Accounts open only from PatientRegistered, so an id billing has never seen
        registered (mistyped, invented, or not yet delivered) is PatientNotFound, and
        asking writes nothing.
        """
        async with self.pool.connection() as conn, conn.cursor() as cur:
            account = await self.store.of_patient(cur, patient_id)
        if account is None:
            raise PatientNotFound(
                f"billing has not seen patient {patient_id} registered;"
                " its account opens when the patient is registered"
            )
        return account

    async def _open(
        self,
        cur: Any,
        patient_id: UUID,
        contact: Contact,
        currency: str,
        opened_by: str,
        registered_at: datetime | None = None,
        patient_version: int = 0,
        correlation_id: str | None = None,
        actor: Actor | None = None,
    ) -> Opened:
        now = _now()
        account, event = Account.open(patient_id, currency, opened_by, now)
        # The unique patient id decides a race: the loser waits for the winner's commit,
        # inserts nothing (no outbox row either), and reads the winner's account.
        if await self.store.insert(
            cur,
            account,
            contact,
            opened_by,
            registered_at,
            patient_version,
            event,
            correlation_id or CORRELATION_ID.get(),
            actor or ACTOR.get(),
        ):
            return Opened(account, created=True)
        existing = await self.store.of_patient(cur, patient_id)
        assert existing is not None
        return Opened(existing, created=False)

    async def account_of_patient(self, patient_id: UUID) -> Account:
        async with self.pool.connection() as conn, conn.cursor() as cur:
            account = await self.store.of_patient(cur, patient_id)
        if account is None:
            raise AccountNotFound(f"patient {patient_id} has no billing account")
        return account

    async def accounts(self, after: UUID | None, limit: int) -> list[Account]:
        """Up to `limit` accounts with ids after `after`, in id order."""
        async with self.pool.connection() as conn, conn.cursor() as cur:
            return await self.store.page(cur, after, limit)

    async def issue_invoice(
        self,
        account_id: UUID,
        currency: str,
        lines: Sequence[InvoiceLine],
        request_id: str | None = None,
    ) -> tuple[Invoice, Account]:
        """Issues an invoice; a retry with the same `request_id` answers the first one."""
        digest = _digest(
            currency, [(x.description, x.quantity, x.unit_amount_minor) for x in lines]
        )
        async with self._writing() as cur:
            account = await self._lock(cur, account_id)
            if request_id is not None:
                found = await self.store.invoice_by_request(cur, account_id, request_id)
                if found is not None:
                    if found[1] != digest:
                        raise RequestReused(
                            f"request_id {request_id!r} was used for another invoice"
                        )
                    return found[0], account
            invoice_id = invoice_id_for(account_id, request_id) if request_id else uuid4()
            issued, event = account.issue_invoice(invoice_id, currency, lines)
            now = _now()
            invoice = Invoice(
                invoice_id, account_id, currency, list(lines), event.total_minor, now, 0
            )
            invoice = await self.store.insert_invoice(cur, invoice, request_id, digest)
            await self.store.save(cur, issued, account.version)
            await self.store.append(cur, issued, event, now, CORRELATION_ID.get(), ACTOR.get())
        return invoice, issued

    async def invoices(self, account_id: UUID, after: int, limit: int) -> list[Invoice]:
        """Up to `limit` of the account's invoices after position `after`, oldest first."""
        async with self.pool.connection() as conn, conn.cursor() as cur:
            if await self.store.get(cur, account_id) is None:
                raise AccountNotFound(f"no billing account {account_id}")
            return await self.store.invoices(cur, account_id, after, limit)

    async def record_payment(
        self, account_id: UUID, amount: Money, request_id: str | None = None
    ) -> tuple[Payment, Account]:
        """Records a payment; a retry with the same `request_id` answers the first one."""
        digest = _digest(amount.currency, amount.amount_minor)
        async with self._writing() as cur:
            account = await self._lock(cur, account_id)
            if request_id is not None:
                found = await self.store.payment_by_request(cur, account_id, request_id)
                if found is not None:
                    if found[1] != digest:
                        raise RequestReused(
                            f"request_id {request_id!r} was used for another payment"
                        )
                    return found[0], account
            payment_id = payment_id_for(account_id, request_id) if request_id else uuid4()
            paid, event = account.record_payment(payment_id, amount)
            now = _now()
            payment = Payment(payment_id, account_id, amount, now)
            await self.store.insert_payment(cur, payment, request_id, digest)
            await self.store.save(cur, paid, account.version)
            await self.store.append(cur, paid, event, now, CORRELATION_ID.get(), ACTOR.get())
        return payment, paid

    @contextlib.asynccontextmanager
    async def _writing(self) -> AsyncIterator[Any]:
        """A cursor in a transaction that PostgreSQL itself ends when the deadline passes.

        Cancelling the call is not enough: a statement waiting for a row lock does not
        notice that its client has gone, so the limit is also the statement timeout.
        """
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            finish_by = FINISH_BY.get()
            if finish_by is not None:
                left_ms = max(1, int((finish_by - time.monotonic()) * 1000))
                await cur.execute(
                    "SELECT set_config('statement_timeout', %s, true)", [f"{left_ms}ms"]
                )
            yield cur

    async def _lock(self, cur: Any, account_id: UUID) -> Account:
        account = await self.store.lock(cur, account_id)
        if account is None:
            raise AccountNotFound(f"no billing account {account_id}")
        return account

    async def apply_patient_events(
        self, batch: Sequence[tuple[Envelope[Any], msgspec.Struct]]
    ) -> Applied:
        """Applies patient events in one transaction. Applying one twice changes nothing."""
        opened = closed = unchanged = 0
        registrations: list[tuple[Envelope[Any], PatientRegisteredV2]] = []
        changes: list[tuple[Envelope[Any], PatientDetailsChangedV1]] = []

        async def change_contacts(cur: Any) -> None:
            """Applies the details changes met since the last other event, in one statement;
            a change for a patient billing has no account for can never apply."""
            nonlocal unchanged
            if not changes:
                return
            known = await self.store.update_contacts(
                cur,
                [
                    (e.aggregate_id, Contact(d.name, d.email), e.aggregate_version)
                    for e, d in changes
                ],
            )
            for envelope, _ in changes:
                if envelope.aggregate_id not in known:
                    raise UnappliableEvent(
                        f"{envelope.type} v{envelope.aggregate_version} for a patient"
                        " billing has no account for"
                    )
            unchanged += len(changes)
            changes.clear()

        async def open_registered(cur: Any) -> None:
            """Opens the accounts of the registrations met since the last other event, in
            one statement (a batch under load is mostly registrations)."""
            nonlocal opened, unchanged
            if not registrations:
                return
            now = _now()
            opening = []
            for envelope, data in registrations:
                account, event = Account.open(
                    envelope.aggregate_id, self.default_currency, OPENED_BY_EVENT, now
                )
                opening.append(
                    Opening(
                        account,
                        Contact(data.name, data.email),
                        event,
                        envelope.occurred_at,
                        envelope.aggregate_version,
                        envelope.correlation_id or CORRELATION_ID.get(),
                        _cause_actor(envelope),
                    )
                )
            # A patient twice in the batch (a redelivery) is inserted for its first only.
            first: dict[UUID, Opening] = {}
            for o in opening:
                first.setdefault(o.account.id, o)
            created = await self.store.insert_many(cur, list(first.values()), OPENED_BY_EVENT)
            for o in opening:
                if o.account.id in created:
                    created.discard(o.account.id)
                    opened += 1
                else:
                    # A replay, or an account opened by a call when calls still could:
                    # keep the registered details.
                    await self.store.update_contact(
                        cur, o.account.patient_id, o.contact, o.patient_version
                    )
                    unchanged += 1
            registrations.clear()

        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            for envelope, data in batch:
                patient_id = envelope.aggregate_id
                version = envelope.aggregate_version
                # Registrations, and details changes, met one after another go as one
                # statement each; what came before an event applies first.
                if isinstance(data, PatientRegisteredV2):
                    await change_contacts(cur)
                    registrations.append((envelope, data))
                    continue
                await open_registered(cur)
                if isinstance(data, PatientDetailsChangedV1):
                    changes.append((envelope, data))
                    continue
                await change_contacts(cur)
                if isinstance(data, PatientRemovedV1):
                    account = await self._require(cur, envelope)
                    now = _now()
                    change = account.close(now)
                    if change is None:
                        unchanged += 1
                        continue
                    closed_account, event = change
                    await self.store.save(cur, closed_account, account.version)
                    await self.store.append(
                        cur,
                        closed_account,
                        event,
                        now,
                        envelope.correlation_id,
                        _cause_actor(envelope),
                    )
                    closed += 1
                elif isinstance(data, PatientErasedV1):
                    await self.store.erase_patient(cur, patient_id)
                    unchanged += 1
                elif isinstance(data, Unreadable) and isinstance(data.sealed, PatientRegisteredV3):
                    # An erased patient's registration (a replay): an account, no contact.
                    await self._open(
                        cur,
                        patient_id,
                        Contact("", ""),
                        self.default_currency,
                        OPENED_BY_EVENT,
                        registered_at=envelope.occurred_at,
                        patient_version=version,
                        correlation_id=envelope.correlation_id,
                    )
                    unchanged += 1
                else:
                    unchanged += 1  # a patient event billing has no use for
            await open_registered(cur)
            await change_contacts(cur)
        return Applied(opened, closed, unchanged)

    async def _require(self, cur: Any, envelope: Envelope[Any]) -> Account:
        account = await self.store.lock_of_patient(cur, envelope.aggregate_id)
        if account is None:
            raise UnappliableEvent(
                f"{envelope.type} v{envelope.aggregate_version} for a patient"
                " billing has no account for"
            )
        return account
