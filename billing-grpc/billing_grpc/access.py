"""Who may call which billing method: every BillingService call shows a bearer token.

The token travels in the call's metadata (`authorization: Bearer <jwt>`) and is checked
with the same `TokenVerifier` as the HTTP services (keys from the auth service's JWKS,
our issuer and audience). `Gate` runs as grpclib's RecvRequest hook, before the method
sees its request, so a refused call reads nothing and writes nothing: no token or a bad
one is UNAUTHENTICATED, a good token whose role is not admitted is PERMISSION_DENIED.
Health and server reflection stay open, like `/health` of the HTTP services.

`METHOD_ROLES` is billing's part of the role matrix; docs/auth.md shows the same table
and tests/unit/test_billing_access_docs.py keeps the two equal.
"""

from __future__ import annotations

from collections.abc import Mapping

from grpclib import GRPCError
from grpclib.const import Status
from grpclib.events import RecvRequest

from billing_grpc.api import RPCS, SERVICE_NAME
from domain.events import ACTOR, Actor
from domain.roles import Role
from runtime.security import InvalidToken, TokenVerifier, bearer_token

ACCOUNT_READERS: frozenset[Role] = frozenset(
    {Role.ADMIN, Role.CLINICIAN, Role.RECEPTIONIST, Role.BILLING}
)
"""See accounts, balances and invoices (analysts have the totals in analytics)."""
ACCOUNT_OPENERS: frozenset[Role] = frozenset({Role.ADMIN, Role.RECEPTIONIST, Role.BILLING})
"""Ask for a registered patient's account (the front desk and billing)."""
CHARGERS: frozenset[Role] = frozenset({Role.ADMIN, Role.BILLING})
"""Issue invoices and record payments."""

METHOD_ROLES: Mapping[str, frozenset[Role]] = {
    "CreateBillingAccount": ACCOUNT_OPENERS,
    "GetBillingAccount": ACCOUNT_READERS,
    "ListBillingAccounts": ACCOUNT_READERS,
    "CreateInvoice": CHARGERS,
    "ListInvoices": ACCOUNT_READERS,
    "RecordPayment": CHARGERS,
}
"""The roles each BillingService method admits. A method missing here admits nobody."""

OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
)
"""Services any caller may use without a token."""


class Gate:
    """grpclib's RecvRequest hook that admits a call only with a token its method accepts."""

    def __init__(self, verifier: TokenVerifier):
        self.verifier = verifier

    async def __call__(self, event: RecvRequest) -> None:
        service, _, method = event.method_name.lstrip("/").partition("/")
        if service in OPEN_SERVICES:
            return
        try:
            await self._admit(event, service, method)
        except GRPCError as refusal:
            # Counted with the calls the methods answer (same labels as `rpc` gives them).
            RPCS.labels(service, method, refusal.status.name).inc()
            raise

    async def _admit(self, event: RecvRequest, service: str, method: str) -> None:
        given = event.metadata.getall("authorization", [])
        token = bearer_token(given[0]) if len(given) == 1 and isinstance(given[0], str) else None
        if token is None:
            raise GRPCError(
                Status.UNAUTHENTICATED,
                "a bearer token is required: metadata `authorization: Bearer <token>`",
            )
        try:
            claims = await self.verifier.verify(token)
        except InvalidToken as exc:
            raise GRPCError(Status.UNAUTHENTICATED, str(exc)) from None
        admitted = METHOD_ROLES.get(method, frozenset()) if service == SERVICE_NAME else frozenset()
        if claims.role not in admitted:
            raise GRPCError(Status.PERMISSION_DENIED, f"your role may not call {method}")
        # The hook runs in the task that then runs the method: what it writes is theirs.
        ACTOR.set(Actor(claims.subject, claims.role.value))
