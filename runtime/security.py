"""Access-token checks every service makes locally, and the Litestar guards built on them.

Tokens are ES256 JWTs with a key id, issued by the auth service. A service checks
the signature with the public key named by `kid` (from the auth service's JWKS,
fetched once and again only when a token names a key not seen before), then
`exp`, `iss`, `aud` and the role. The gateway has already checked the token; the
services check it again (defence in depth). An app keeps its `TokenVerifier` in
`app.state.verifier`; each endpoint names the roles it admits with `requires`.

A verified token can still be revoked before it expires: a disabled user's tokens
issued at or before the disable, and every token of a logged-out session (`sid`).
The auth service keeps these in `auth.revocations`; each process holds them in
memory (`Revocations`, a dict lookup per request, cached tokens included), kept
current by a `RevocationFeed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import anyio
import jwt
import msgspec
import psycopg
import structlog
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm
from litestar import Litestar
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers import BaseRouteHandler
from litestar.types import Guard

from domain.events import ACTOR, Actor
from domain.roles import Role
from runtime.http import operations, route_roles
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
    issued_at: int = 0
    session: str | None = None
    """The session (`sid`) the token belongs to; a logout revokes it."""


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


REVOCATION_CHANNEL = "carelog_revocations"
"""The PostgreSQL channel that announces each row written to `auth.revocations`."""


class Revocation(msgspec.Struct, frozen=True, rename="camel"):
    """One revoked subject (a disabled user) or session (a logout), as announced.

    A subject's tokens issued at or before `cutoff` (seconds since the epoch, by the
    issuer's clock) are refused; a session's tokens are refused whatever their age.
    Either is kept until `expires_at`, when every token it could refuse has expired.
    """

    kind: Literal["subject", "session"]
    key: str
    cutoff: int
    expires_at: int


class Revocations:
    """The revocations in force, in memory: `refuses` is a dict lookup or two."""

    def __init__(self) -> None:
        self.subjects: dict[str, Revocation] = {}
        self.sessions: dict[str, Revocation] = {}

    def refuses(self, claims: Claims) -> bool:
        subject = self.subjects.get(claims.subject)
        if subject is not None and claims.issued_at <= subject.cutoff:
            return True
        return claims.session is not None and claims.session in self.sessions

    def apply(self, revocation: Revocation) -> None:
        """Adds a revocation; of two for the same key, the later cutoff wins."""
        table = self.subjects if revocation.kind == "subject" else self.sessions
        known = table.get(revocation.key)
        if known is None or revocation.cutoff >= known.cutoff:
            table[revocation.key] = revocation

    def replace(self, revocations: Iterable[Revocation]) -> None:
        """Swaps in a complete set (a reload), at once."""
        subjects: dict[str, Revocation] = {}
        sessions: dict[str, Revocation] = {}
        for revocation in revocations:
            (subjects if revocation.kind == "subject" else sessions)[revocation.key] = revocation
        self.subjects, self.sessions = subjects, sessions

    def prune(self, now: float) -> bool:
        """Forgets revocations whose tokens have all expired; True if any were."""
        expired = [r for r in self.entries() if r.expires_at < now]
        for revocation in expired:
            table = self.subjects if revocation.kind == "subject" else self.sessions
            table.pop(revocation.key, None)
        return bool(expired)

    def entries(self) -> list[Revocation]:
        return [*self.subjects.values(), *self.sessions.values()]


_LOAD_REVOCATIONS = (
    "SELECT kind, key, floor(extract(epoch FROM revoked_at))::bigint,"
    " ceil(extract(epoch FROM expires_at))::bigint"
    " FROM auth.revocations WHERE expires_at > now()"
)


class RevocationFeed:
    """Keeps a `Revocations` current from PostgreSQL: a full load, then LISTEN/NOTIFY.

    PostgreSQL holds the durable list (the auth service writes it), so its own
    LISTEN/NOTIFY is the push: a trigger announces each row when its transaction
    commits, never before and never for a rollback, in commit order, within
    milliseconds, with no other server to run or fail. A notification sent while
    the feed is disconnected is lost, so every (re)connect listens first and then
    reloads the whole list; a row committed in between arrives both ways, which
    `apply` makes harmless. TCP keepalives and a query every `tick` seconds notice a
    dead connection; the tick also forgets expired revocations.
    """

    def __init__(
        self,
        database_url: str,
        revocations: Revocations | None = None,
        on_change: Callable[[], None] | None = None,
        tick: float = 30.0,
    ):
        self.database_url = database_url
        self.revocations = revocations if revocations is not None else Revocations()
        self.on_change = on_change or (lambda: None)
        self.tick = tick
        self.loaded = asyncio.Event()
        """Set once the first full load is in; a reconnect keeps it set (the list is stale)."""
        self.connected = False
        self._task: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 10.0) -> None:
        """Runs the feed in the background; returns when the first load is in, or raises
        TimeoutError (a service must not admit tokens it cannot check)."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="revocation-feed")
        await asyncio.wait_for(self.loaded.wait(), timeout)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        """Listens for ever, reconnecting (and reloading) soon after any failure."""
        failures = 0
        while True:
            try:
                await self._listen()
            except (psycopg.Error, OSError, msgspec.DecodeError) as exc:
                if self.connected:
                    failures = 0
                if failures == 0:  # once per outage, not once per attempt
                    log.warning("revocation feed interrupted", error=type(exc).__name__)
                failures += 1
            self.connected = False
            await asyncio.sleep(min(0.1 * 2**failures, 2.0))

    async def _listen(self) -> None:
        async with await psycopg.AsyncConnection.connect(
            self.database_url,
            autocommit=True,
            connect_timeout=5,
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        ) as conn:
            await conn.execute(f"LISTEN {REVOCATION_CHANNEL}")
            rows = await (await conn.execute(_LOAD_REVOCATIONS)).fetchall()
            self.revocations.replace(Revocation(*row) for row in rows)
            reconnected = self.loaded.is_set()
            self.connected = True
            self.loaded.set()
            self.on_change()
            log.info("revocations loaded", count=len(rows), reconnected=reconnected)
            while True:
                async for notice in conn.notifies(timeout=self.tick):
                    self.revocations.apply(msgspec.json.decode(notice.payload, type=Revocation))
                    self.on_change()
                await conn.execute("SELECT 1")
                if self.revocations.prune(time.time()):
                    self.on_change()


class TokenVerifier:
    """Checks an access token completely, or raises InvalidToken.

    A token that verified once is remembered until it expires (a signature check
    costs ~0.2 ms of CPU; a client sends the same token for minutes); whether it has
    been revoked since is asked on every call, of `revocations`.

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
        revocations: Revocations | None = None,
        feed: RevocationFeed | None = None,
    ):
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.clock = clock
        self.feed = feed
        self.revocations = feed.revocations if feed is not None else revocations
        self._verified: OrderedDict[str, Claims] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        """Keys from the auth service's JWKS; issuer and audience from the settings; the
        revocations from the database (`start()` before serving, `stop()` after)."""
        return cls(
            JwksKeys(settings.jwks_url),
            settings.jwt_issuer,
            settings.jwt_audience,
            feed=RevocationFeed(settings.database_url),
        )

    async def start(self) -> None:
        """Loads the revocations and follows them (a lifespan hook; nothing without a feed)."""
        if self.feed is not None:
            await self.feed.start()

    async def stop(self) -> None:
        if self.feed is not None:
            await self.feed.stop()

    async def verify(self, token: str) -> Claims:
        claims = self._verified.get(token)
        if claims is None or claims.expires_at + LEEWAY_SECONDS <= self.clock():
            claims = await self._verify(token)
            self._verified[token] = claims
            if len(self._verified) > self.CACHE_SIZE:
                self._verified.popitem(last=False)
        if self.revocations is not None and self.revocations.refuses(claims):
            raise InvalidToken("revoked token")
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
            session = payload.get("sid")
            if session is not None and not isinstance(session, str):
                raise ValueError("sid is not a string")
            return Claims(
                str(payload["sub"]),
                Role(payload["role"]),
                int(payload["exp"]),
                issued_at=int(payload["iat"]),
                session=session,
            )
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError):
            raise InvalidToken("invalid token") from None


def with_verifier(create_app: Callable[..., Litestar], settings: Settings) -> Litestar:
    """`create_app(settings, verifier=...)`, checking tokens against the auth service's
    JWKS and revocations; the verifier follows revocations while the app runs."""
    verifier = TokenVerifier.from_settings(settings)
    app = create_app(settings, verifier=verifier)
    app.on_startup.append(verifier.start)
    app.on_shutdown.append(verifier.stop)
    return app


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
    # The request's own task (and the worker threads it starts, which copy the context)
    # now acts as this user: every event the request causes records who it was.
    ACTOR.set(Actor(claims.subject, claims.role.value))
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
    """Every (method, path) of an app and the roles it admits; None means unguarded.

    Paths are as its OpenAPI document writes them (`/patients/{patient_id}`), so the
    matrix and the document name each operation alike.
    """
    return {(method, path): route_roles(handler) for method, path, handler in operations(app)}
