"""Litestar guards: each endpoint names the roles it admits and checks the token itself.

The gateway has already checked the token; the services check it again (defence
in depth), so a request that reaches a service some other way is held to the
same rules. The app keeps its `TokenVerifier` in `app.state.verifier`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from litestar import Litestar
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler, HTTPRouteHandler
from litestar.types import Guard

from auth.roles import Role
from auth.tokens import Claims, InvalidToken, TokenVerifier

CHALLENGE = 'Bearer realm="carelog"'


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any]) -> Claims:
    """The verified claims of the request's bearer token; 401 when there are none."""
    token = bearer_token(connection.headers.get("authorization"))
    if token is None:
        raise NotAuthorizedException(
            "a bearer token is required", headers={"WWW-Authenticate": CHALLENGE}
        )
    verifier: TokenVerifier = connection.app.state.verifier
    try:
        claims = await verifier.verify(token)
    except InvalidToken as exc:
        raise NotAuthorizedException(
            str(exc), headers={"WWW-Authenticate": f'{CHALLENGE}, error="invalid_token"'}
        ) from None
    connection.state.claims = claims
    return claims


def requires(roles: Iterable[Role]) -> Guard:
    """A guard that admits a valid token whose role is one of `roles` (else 401 / 403)."""
    admitted = frozenset(roles)

    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        claims = await authenticate(connection)
        if claims.role not in admitted:
            raise PermissionDeniedException("your role may not do this")

    guard.roles = admitted  # type: ignore[attr-defined]
    return guard


def role_matrix(app: Litestar) -> dict[tuple[str, str], frozenset[Role] | None]:
    """Every (method, path) of an app and the roles it admits; None means unguarded."""
    matrix: dict[tuple[str, str], frozenset[Role] | None] = {}
    for route in app.routes:
        for handler in getattr(route, "route_handlers", []):
            if not isinstance(handler, HTTPRouteHandler):
                continue
            roles = None
            for guard in handler.resolve_guards():
                roles = getattr(guard, "roles", roles)
            for method in sorted(handler.http_methods - {"OPTIONS", "HEAD"}):
                matrix[(method, route.path)] = roles
    return matrix
