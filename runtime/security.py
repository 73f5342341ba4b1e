"""Access-token checks every service makes locally, and the Litestar guards built on them.

Tokens are ES256 JWTs with a key id, issued by the auth service. A service checks
the signature with the public key named by `kid` (from the auth service's JWKS,
fetched once and again only when a token names a key not seen before), then
`exp`, `iss`, `aud` and the role. The gateway has already checked the token; the
services check it again (defence in depth). An app keeps its `TokenVerifier` in
`app.state.verifier`; each endpoint names the roles it admits with `requires`.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from litestar import Litestar
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler, HTTPRouteHandler
from litestar.types import Guard

from domain.roles import Role
from runtime.settings import Settings

log = structlog.get_logger(__name__)

ALGORITHM = "ES256"
KID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""A key id: safe in a file name, a gateway rule and a JWT header."""
LEEWAY_SECONDS = 5
_REQUIRED = ["exp", "iat", "sub", "iss", "aud", "role"]


class InvalidToken(Exception):
    """The bearer token is missing, malformed, forged, expired or meant for someone else."""


@dataclass(frozen=True)
class Claims:
    """What a verified access token says about its bearer."""

    subject: str
    role: Role
    expires_at: int


class PublicKeys(Protocol):
    async def get(self, kid: str) -> ec.EllipticCurvePublicKey | None: ...


class StaticKeys:
    """A fixed set of public keys (tests, or keys read from files)."""

    def __init__(self, keys: dict[str, ec.EllipticCurvePublicKey]):
        self.keys = keys

    async def get(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        return self.keys.get(kid)


def keys_from_jwks(document: dict[str, Any]) -> dict[str, ec.EllipticCurvePublicKey]:
    keys = {}
    for jwk in document.get("keys", []):
        if jwk.get("kty") == "EC" and jwk.get("crv") == "P-256" and isinstance(jwk.get("kid"), str):
            key = ECAlgorithm.from_jwk(jwk)
            if isinstance(key, ec.EllipticCurvePublicKey):
                keys[jwk["kid"]] = key
    return keys


def fetch_jwks(url: str, timeout: float = 3.0) -> dict[str, Any]:
    if not url.startswith(("http://", "https://")):
        raise ValueError("the JWKS URL must be http(s)")
    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (checked above)
        document: dict[str, Any] = json.loads(response.read())
    return document


class JwksKeys:
    """Public keys from a JWKS URL, fetched lazily, refetched on an unknown `kid`.

    Refetches are at least `min_interval` apart, so tokens with invented key ids
    cannot make this process hammer the auth service.
    """

    def __init__(self, url: str, min_interval: float = 5.0):
        self.url = url
        self.min_interval = min_interval
        self.keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._fetched_at = -float("inf")
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._fetched_at < self.min_interval:
                return
            self._fetched_at = time.monotonic()
            try:
                document = await anyio.to_thread.run_sync(lambda: fetch_jwks(self.url))
            except (OSError, ValueError) as exc:
                log.warning("jwks fetch failed", url=self.url, error=type(exc).__name__)
                return
            self.keys = keys_from_jwks(document)
            log.info("jwks fetched", kids=sorted(self.keys))

    async def get(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        if kid not in self.keys:
            await self.refresh()
        return self.keys.get(kid)


class TokenVerifier:
    """Checks an access token completely, or raises InvalidToken.

    A token that verified once is remembered until it expires (a signature check
    costs ~0.2 ms of CPU; a client sends the same token for minutes).

    Time is `clock()` (seconds since the epoch), for the cache and for the token's
    `exp`, `iat` and `nbf` alike, so a test can move time on instead of sleeping.
    """

    CACHE_SIZE = 4096

    def __init__(
        self,
        keys: PublicKeys,
        issuer: str,
        audience: str,
        clock: Callable[[], float] = time.time,
    ):
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.clock = clock
        self._verified: OrderedDict[str, Claims] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        """Keys from the auth service's JWKS; issuer and audience from the settings."""
        return cls(JwksKeys(settings.jwks_url), settings.jwt_issuer, settings.jwt_audience)

    async def verify(self, token: str) -> Claims:
        claims = self._verified.get(token)
        if claims is not None and claims.expires_at + LEEWAY_SECONDS > self.clock():
            return claims
        claims = await self._verify(token)
        self._verified[token] = claims
        if len(self._verified) > self.CACHE_SIZE:
            self._verified.popitem(last=False)
        return claims

    async def _verify(self, token: str) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        kid = header.get("kid")
        if header.get("alg") != ALGORITHM or not isinstance(kid, str):
            raise InvalidToken("unsupported token")
        key = await self.keys.get(kid)
        if key is None:
            raise InvalidToken("unknown signing key")
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=self.audience,
                issuer=self.issuer,
                options={
                    "require": _REQUIRED,
                    # PyJWT would judge these by the real clock; _check_times uses ours.
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
            _check_times(payload, self.clock())
            return Claims(str(payload["sub"]), Role(payload["role"]), int(payload["exp"]))
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError):
            raise InvalidToken("invalid token") from None


def _check_times(payload: dict[str, Any], now: float) -> None:
    """PyJWT's checks of `exp`, `iat` and `nbf` (with LEEWAY_SECONDS), judged at `now`.

    Raises ValueError (or TypeError / OverflowError from a non-numeric claim).
    """
    if int(payload["exp"]) <= now - LEEWAY_SECONDS:
        raise ValueError("expired")
    if int(payload["iat"]) > now + LEEWAY_SECONDS:
        raise ValueError("issued in the future")
    if "nbf" in payload and int(payload["nbf"]) > now + LEEWAY_SECONDS:
        raise ValueError("not yet valid")


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
