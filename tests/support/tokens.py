"""Access tokens for tests: a key of the test's own that the app under test trusts."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from auth.config import AuthSettings
from auth.keys import KeyRing, SigningKey
from auth.tokens import issue_access_token
from domain.roles import Role
from runtime.security import StaticKeys, TokenVerifier


def auth_settings(keys_dir: Path, **changes: Any) -> AuthSettings:
    """Development-mode auth settings with the keys in `keys_dir` (a test's temporary dir)."""
    defaults: dict[str, Any] = {
        "development": True,
        "keys_directory": str(keys_dir),
        "jwks_url": "http://127.0.0.1:1/unused",
        "hash_workers": 2,
    }
    return AuthSettings(**(defaults | changes))


class TestTokens:
    """Signs tokens the way the auth service does, with a key only this test run has."""

    __test__ = False

    def __init__(self, keys_dir: Path):
        self.settings = auth_settings(keys_dir)
        self.ring = KeyRing(self.settings.keys_dir).ensure(development=True)
        self.key: SigningKey = self.ring.current
        self.verifier = self.verifier_with_clock(time.time)

    def verifier_with_clock(self, clock: Callable[[], float]) -> TokenVerifier:
        """A fresh verifier (empty cache) of this test's key that tells time by `clock`."""
        return TokenVerifier(
            StaticKeys({self.key.kid: self.key.public_key}),
            self.settings.issuer,
            self.settings.audience,
            clock=clock,
        )

    def token(self, role: Role = Role.ADMIN, subject: str | None = None) -> str:
        return issue_access_token(self.key, subject or str(uuid.uuid4()), role, self.settings)

    def headers(self, role: Role = Role.ADMIN, subject: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(role, subject)}"}

    def forged(self, kind: str) -> str:
        """A token that must be refused, of the given kind (see BAD_TOKEN_KINDS)."""
        return bad_token(kind, self.key, self.settings)


BAD_TOKEN_KINDS = (
    "tampered",
    "expired",
    "alg-none",
    "hs256-with-public-key",
    "wrong-key",
    "unknown-kid",
    "wrong-audience",
    "wrong-issuer",
    "no-exp",
    "unknown-role",
    "garbage",
)


def bad_token(kind: str, key: SigningKey, settings: AuthSettings) -> str:
    """A token of `kind` that a correct verifier refuses; signed by `key` where that matters."""
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.issuer,
        "aud": settings.audience,
        "sub": str(uuid.uuid4()),
        "role": Role.ADMIN.value,
        "iat": now,
        "exp": now + 300,
    }
    header = {"kid": key.kid}
    signer: Any = key.private_key
    algorithm = "ES256"
    if kind == "tampered":
        head, _, signature = jwt.encode(
            {**claims, "role": Role.ANALYST.value}, signer, algorithm=algorithm, headers=header
        ).split(".")
        return f"{head}.{_b64(json.dumps(claims).encode())}.{signature}"
    if kind == "expired":
        claims |= {"iat": now - 3600, "exp": now - 1800}
    elif kind == "alg-none":
        return jwt.encode(claims, None, algorithm="none", headers=header)
    elif kind == "hs256-with-public-key":
        secret = key.public_pem()
        return _hs256(claims, secret, header)
    elif kind == "wrong-key":
        signer = ec.generate_private_key(ec.SECP256R1())
    elif kind == "unknown-kid":
        signer = ec.generate_private_key(ec.SECP256R1())
        header = {"kid": "no-such-key"}
    elif kind == "wrong-audience":
        claims["aud"] = "someone-else"
    elif kind == "wrong-issuer":
        claims["iss"] = "https://evil.example"
    elif kind == "no-exp":
        del claims["exp"]
    elif kind == "unknown-role":
        claims["role"] = "superuser"
    elif kind == "garbage":
        return "not.a.jwt"
    else:
        raise ValueError(kind)
    return jwt.encode(claims, signer, algorithm=algorithm, headers=header)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _hs256(claims: dict[str, Any], secret: bytes, header: dict[str, str]) -> str:
    """HS256 signed with the public key as the secret (PyJWT refuses to, so by hand)."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", **header}).encode())
    body = _b64(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{_b64(signature)}"


@contextmanager
def served_jwks(tokens: TestTokens) -> Iterator[str]:
    """The session key's JWKS over HTTP (its URL), as the auth service publishes its keys,
    for a service process the test starts to fetch."""
    document = json.dumps(tokens.ring.jwks()).encode()

    class Jwks(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(document)))
            self.end_headers()
            self.wfile.write(document)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Jwks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/auth/.well-known/jwks.json"
    finally:
        server.shutdown()
        server.server_close()
