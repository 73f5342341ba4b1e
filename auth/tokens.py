"""Issuing access tokens (ES256 JWTs with a key id); checking them is `runtime.security`'s."""

from __future__ import annotations

import time
import uuid

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from auth.config import AuthSettings
from auth.keys import KeyRing, SigningKey
from domain.roles import Role
from runtime.security import ALGORITHM


def issue_access_token(
    key: SigningKey,
    subject: str,
    role: Role,
    settings: AuthSettings,
    now: float | None = None,
    session: str | None = None,
) -> str:
    """A signed access token; `session` (the `sid` claim) is what a logout revokes."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, str | int] = {
        "iss": settings.issuer,
        "aud": settings.audience,
        "sub": subject,
        "role": role.value,
        "iat": issued,
        "exp": issued + settings.access_ttl_seconds,
        "jti": uuid.uuid4().hex,
    }
    if session is not None:
        claims["sid"] = session
    return jwt.encode(claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid})


class RingKeys:
    """The public halves of a key ring in this process (the auth service itself)."""

    def __init__(self, ring: KeyRing):
        self.ring = ring

    async def get(self, kid: str) -> ec.EllipticCurvePublicKey | None:
        self.ring.refresh()
        key = self.ring.keys.get(kid)
        return key.public_key if key else None
