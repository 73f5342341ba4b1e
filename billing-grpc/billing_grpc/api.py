"""The gRPC edge: `carelog.billing.v1.BillingService` on grpclib.

Each method decodes its request into checked values, calls one use case of
`Billing`, and maps the result. Errors become gRPC statuses in one place
(`status_of`): what a client got wrong is INVALID_ARGUMENT (naming each field),
NOT_FOUND, ALREADY_EXISTS or FAILED_PRECONDITION, never UNKNOWN or INTERNAL.
A request's deadline is honoured by grpclib, which cancels the handler; the
cancelled transaction rolls back. Who may call a method is decided before it runs
(`billing_grpc.access`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import time
import uuid
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar

import psycopg
import psycopg.errors
import psycopg_pool
import structlog
from grpclib import GRPCError
from grpclib.const import Status
from grpclib.events import RecvRequest
from opentelemetry.context import Context
from prometheus_client import Counter, Histogram

from billing_grpc.generated.carelog.billing import v1 as pb
from billing_grpc.service import CORRELATION_ID, FINISH_BY, Billing
from billing_grpc.store import Invoice, Payment
from domain.billing import (
    Account,
    AccountClosed,
    AccountLimitReached,
    AccountNotFound,
    AccountStatus,
    CurrencyMismatch,
    Money,
    Overpayment,
    RequestReused,
    check,
    parse_amount,
    parse_contact,
    parse_currency,
    parse_lines,
    parse_request_id,
    parse_uuid,
)
from domain.errors import InvalidData, PatientNotFound
from runtime import tracing

log = structlog.get_logger(__name__)

# The conventional gRPC labels: the full service name, the method as the proto names
# it (`GetBillingAccount`), and the status code's name.
RPCS = Counter(
    "carelog_grpc_requests_total",
    "gRPC calls answered",
    ["grpc_service", "grpc_method", "grpc_code"],
)
RPC_LATENCY = Histogram(
    "carelog_grpc_request_seconds",
    "Time to answer a gRPC call",
    ["grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

SERVICE_NAME = "carelog.billing.v1.BillingService"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
CORRELATION_KEY = "x-correlation-id"

# Expected failures and their statuses; the first matching class wins.
STATUSES: list[tuple[type[Exception], Status]] = [
    (psycopg.errors.QueryCanceled, Status.DEADLINE_EXCEEDED),  # the statement timeout
    (InvalidData, Status.INVALID_ARGUMENT),
    (AccountNotFound, Status.NOT_FOUND),
    (PatientNotFound, Status.NOT_FOUND),  # a patient billing never saw registered
    (RequestReused, Status.ALREADY_EXISTS),
    (AccountClosed, Status.FAILED_PRECONDITION),
    (CurrencyMismatch, Status.FAILED_PRECONDITION),
    (Overpayment, Status.FAILED_PRECONDITION),
    (AccountLimitReached, Status.FAILED_PRECONDITION),
    (psycopg.OperationalError, Status.UNAVAILABLE),
    (psycopg_pool.PoolTimeout, Status.UNAVAILABLE),
]


def status_of(exc: Exception) -> GRPCError:
    """The gRPC error a client gets for `exc`; unexpected ones are logged and INTERNAL."""
    for kind, status in STATUSES:
        if isinstance(exc, kind):
            if status is Status.UNAVAILABLE:
                log.warning("dependency unavailable", error=type(exc).__name__)
                return GRPCError(status, "a dependency is unavailable; retry shortly")
            return GRPCError(status, str(exc))
    log.exception("unexpected error")
    return GRPCError(Status.INTERNAL, "internal error")


CALLER_TRACE: ContextVar[Context | None] = ContextVar("carelog_caller_trace", default=None)
"""The trace context the caller's `traceparent` metadata carried, if tracing is on."""

SERVER_FAULTS = frozenset(
    {
        Status.UNKNOWN,
        Status.DEADLINE_EXCEEDED,
        Status.UNIMPLEMENTED,
        Status.INTERNAL,
        Status.UNAVAILABLE,
        Status.DATA_LOSS,
    }
)
"""Statuses that mark a call's span as failed; the rest are the caller's doing."""

R = TypeVar("R")
P = ParamSpec("P")


def rpc(method: Callable[P, Coroutine[Any, Any, R]]) -> Callable[P, Coroutine[Any, Any, R]]:
    """Maps a method's errors to statuses and measures it."""
    name = "".join(word.capitalize() for word in method.__name__.split("_"))

    async def measured(*args: P.args, **kwargs: P.kwargs) -> R:
        started = time.perf_counter()
        code = Status.OK
        try:
            return await method(*args, **kwargs)
        except GRPCError as exc:
            code = exc.status
            raise
        except asyncio.CancelledError:
            code = Status.CANCELLED  # the deadline passed or the client went away
            raise
        except Exception as exc:
            error = status_of(exc)
            code = error.status
            raise error from None
        finally:
            RPCS.labels(SERVICE_NAME, name, code.name).inc()
            RPC_LATENCY.labels(SERVICE_NAME, name).observe(time.perf_counter() - started)

    @functools.wraps(method)
    async def handler(*args: P.args, **kwargs: P.kwargs) -> R:
        if not tracing.enabled():
            return await measured(*args, **kwargs)
        with tracing.tracer().start_as_current_span(
            f"{SERVICE_NAME}/{name}",
            context=CALLER_TRACE.get(),
            kind=tracing.SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": SERVICE_NAME,
                "rpc.method": name,
                tracing.CORRELATION_ID: CORRELATION_ID.get() or "",
            },
            **tracing.QUIET,
        ) as span:
            code = Status.OK
            try:
                return await measured(*args, **kwargs)
            except GRPCError as exc:
                code = exc.status
                raise
            except asyncio.CancelledError:
                code = Status.CANCELLED
                raise
            finally:
                span.set_attribute("rpc.grpc.status_code", code.value)
                if code in SERVER_FAULTS:
                    span.set_status(tracing.Status(tracing.StatusCode.ERROR, code.name))

    return handler


async def on_request(event: RecvRequest) -> None:
    """Keeps the caller's correlation id (or a new one) with whatever the call changes, and
    its deadline for the database. Runs in the task that then runs the method."""
    given = event.metadata.get(CORRELATION_KEY)
    value = given if isinstance(given, str) and 0 < len(given) <= 100 else str(uuid.uuid4())
    CORRELATION_ID.set(value)
    if tracing.enabled():
        CALLER_TRACE.set(tracing.extract(event.metadata.items()))
    if event.deadline is not None:
        FINISH_BY.set(time.monotonic() + event.deadline.time_remaining())


# --- Mapping to messages ---------------------------------------------------------------

_STATUS = {AccountStatus.OPEN: pb.AccountStatus.OPEN, AccountStatus.CLOSED: pb.AccountStatus.CLOSED}
SEED_STATUS = {AccountStatus.OPEN: "ACTIVE", AccountStatus.CLOSED: "CLOSED"}
"""CreateBillingAccountResponse.status as the seed's clients read it."""


def money(amount_minor: int, currency: str) -> pb.Money:
    return pb.Money(currency_code=currency, amount_minor=amount_minor)


def account_message(account: Account) -> pb.BillingAccount:
    return pb.BillingAccount(
        account_id=str(account.id),
        patient_id=str(account.patient_id),
        status=_STATUS[account.status],
        currency_code=account.currency,
        balance=money(account.balance_minor, account.currency),
        invoiced=money(account.invoiced_minor, account.currency),
        paid=money(account.paid_minor, account.currency),
        opened_at=account.opened_at,
        closed_at=account.closed_at,
    )


def invoice_message(invoice: Invoice) -> pb.Invoice:
    return pb.Invoice(
        invoice_id=str(invoice.id),
        account_id=str(invoice.account_id),
        lines=[
            pb.InvoiceLine(
                description=line.description,
                quantity=line.quantity,
                unit_amount_minor=line.unit_amount_minor,
            )
            for line in invoice.lines
        ],
        total=money(invoice.total_minor, invoice.currency),
        issued_at=invoice.issued_at,
    )


def payment_message(payment: Payment) -> pb.Payment:
    return pb.Payment(
        payment_id=str(payment.id),
        account_id=str(payment.account_id),
        amount=money(payment.amount.amount_minor, payment.amount.currency),
        received_at=payment.received_at,
    )


# --- Page tokens: opaque to clients, checked on the way in --------------------------------

_NOT_ISSUED = "is not a token this service issued"


def _token(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


def _untoken(errors: dict[str, str], field: str, token: str, prefix: str) -> str | None:
    if not token:
        return None
    try:
        value = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        value = ""
    if not value.startswith(prefix):
        errors[field] = _NOT_ISSUED
        return None
    return value.removeprefix(prefix)


def _page_size(errors: dict[str, str], field: str, size: int) -> int:
    if size < 0:
        errors[field] = "must not be negative"
    return min(size, MAX_PAGE_SIZE) if size > 0 else DEFAULT_PAGE_SIZE


class BillingApi(pb.BillingServiceBase):
    """The gRPC methods; each one decodes, calls `Billing`, and maps."""

    def __init__(self, billing: Billing):
        self.billing = billing

    @rpc
    async def create_billing_account(
        self, message: pb.CreateBillingAccountRequest
    ) -> pb.CreateBillingAccountResponse:
        # Accounts open when billing sees the patient registered; this answers that one.
        # The contact and currency are checked as the contract asks, and the
        # registered details win.
        errors: dict[str, str] = {}
        patient_id = parse_uuid(errors, "patient_id", message.patient_id)
        parse_contact(errors, message.name, message.email)
        if message.currency_code:
            parse_currency(errors, "currency_code", message.currency_code)
        check(errors)
        assert patient_id is not None
        account = await self.billing.account_of_registered(patient_id)
        return pb.CreateBillingAccountResponse(
            account_id=str(account.id),
            status=SEED_STATUS[account.status],
            account=account_message(account),
        )

    @rpc
    async def get_billing_account(self, message: pb.GetBillingAccountRequest) -> pb.BillingAccount:
        errors: dict[str, str] = {}
        patient_id = parse_uuid(errors, "patient_id", message.patient_id)
        check(errors)
        assert patient_id is not None
        return account_message(await self.billing.account_of_patient(patient_id))

    @rpc
    async def list_billing_accounts(
        self, message: pb.ListBillingAccountsRequest
    ) -> pb.ListBillingAccountsResponse:
        errors: dict[str, str] = {}
        size = _page_size(errors, "page_size", message.page_size)
        after_text = _untoken(errors, "page_token", message.page_token, "a:")
        after = parse_uuid(errors, "page_token", after_text) if after_text is not None else None
        check(errors)
        accounts = await self.billing.accounts(after, size + 1)
        more = len(accounts) > size
        accounts = accounts[:size]
        return pb.ListBillingAccountsResponse(
            accounts=[account_message(a) for a in accounts],
            next_page_token=_token(f"a:{accounts[-1].id}") if more else "",
        )

    @rpc
    async def create_invoice(self, message: pb.CreateInvoiceRequest) -> pb.CreateInvoiceResponse:
        errors: dict[str, str] = {}
        account_id = parse_uuid(errors, "account_id", message.account_id)
        currency = parse_currency(errors, "currency_code", message.currency_code)
        lines = parse_lines(
            errors,
            "lines",
            [(x.description, x.quantity, x.unit_amount_minor) for x in message.lines],
        )
        request_id = parse_request_id(errors, "request_id", message.request_id)
        check(errors)
        assert account_id is not None
        invoice, account = await self.billing.issue_invoice(account_id, currency, lines, request_id)
        return pb.CreateInvoiceResponse(
            invoice=invoice_message(invoice), account=account_message(account)
        )

    @rpc
    async def list_invoices(self, message: pb.ListInvoicesRequest) -> pb.ListInvoicesResponse:
        errors: dict[str, str] = {}
        account_id = parse_uuid(errors, "account_id", message.account_id)
        size = _page_size(errors, "page_size", message.page_size)
        after_text = _untoken(errors, "page_token", message.page_token, "i:")
        after = 0
        if after_text is not None:
            if after_text.isdigit() and len(after_text) <= 18:
                after = int(after_text)
            else:
                errors["page_token"] = _NOT_ISSUED
        check(errors)
        assert account_id is not None
        invoices = await self.billing.invoices(account_id, after, size + 1)
        more = len(invoices) > size
        invoices = invoices[:size]
        return pb.ListInvoicesResponse(
            invoices=[invoice_message(i) for i in invoices],
            next_page_token=_token(f"i:{invoices[-1].seq}") if more else "",
        )

    @rpc
    async def record_payment(self, message: pb.RecordPaymentRequest) -> pb.RecordPaymentResponse:
        errors: dict[str, str] = {}
        account_id = parse_uuid(errors, "account_id", message.account_id)
        given = message.amount
        amount: Money = parse_amount(
            errors,
            "amount",
            (given.currency_code, given.amount_minor) if given is not None else None,
        )
        request_id = parse_request_id(errors, "request_id", message.request_id)
        check(errors)
        assert account_id is not None
        payment, account = await self.billing.record_payment(account_id, amount, request_id)
        return pb.RecordPaymentResponse(
            payment=payment_message(payment), account=account_message(account)
        )
