"""Access tokens: ES256 JWTs with a key id, issued by the auth service, checked anywhere.

Every service verifies locally: signature with the public key named by `kid`,
then `exp`, `iss`, `aud` and the role. Public keys come from the auth service's
JWKS, fetched once and again only when a token names a key not seen before.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import jwt
import structlog
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from auth.config import AuthSettings
from auth.keys import ALGORITHM, KeyRing, SigningKey
from auth.roles import Role
from ops.settings import Settings

log = structlog.get_logger(__name__)

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


def issue_access_token(
    key: SigningKey, subject: str, role: Role, settings: AuthSettings, now: float | None = None
) -> str:
    issued = int(time.time() if now is None else now)
    claims = {
        "iss": settings.issuer,
        "aud": settings.audience,
        "sub": subject,
        "role": role.value,
        "iat": issued,
        "exp": issued + settings.access_ttl_seconds,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid})


class PublicKeys(Protocol):
    async def get(self, kid: str) -> ec.EllipticCurvePublicKey | None: ...


class StaticKeys:
    """A fixed set of public keys (tests, or keys read from files)."""

    def __init__(self, keys: dict[str, ec.EllipticCurvePublicKey]):
        self.keys = keys

    async def get(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        return self.keys.get(kid)


class RingKeys:
    """The public halves of a key ring in this process (the auth service itself)."""

    def __init__(self, ring: KeyRing):
        self.ring = ring

    async def get(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        self.ring.refresh()
        key = self.ring.keys.get(kid)
        return key.public_key if key else None


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
    """

    CACHE_SIZE = 4096

    def __init__(self, keys: PublicKeys, issuer: str, audience: str):
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self._verified: OrderedDict[str, Claims] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> TokenVerifier:
        return cls(JwksKeys(settings.jwks_url), settings.issuer, settings.audience)

    async def verify(self, token: str) -> Claims:
        claims = self._verified.get(token)
        if claims is not None and claims.expires_at + LEEWAY_SECONDS > time.time():
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
                leeway=LEEWAY_SECONDS,
                options={"require": _REQUIRED},
            )
            return Claims(str(payload["sub"]), Role(payload["role"]), int(payload["exp"]))
        except (jwt.PyJWTError, ValueError):
            raise InvalidToken("invalid token") from None


def service_verifier(settings: Settings) -> TokenVerifier:
    """The verifier a service uses by default: the auth service's JWKS, in the same mode."""
    return TokenVerifier.from_settings(
        AuthSettings.from_env({**os.environ, "CARELOG_ENV": settings.env})
    )
