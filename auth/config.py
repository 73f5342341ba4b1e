"""The identity service's settings, read from the environment once when it starts.

Variables (all optional in development mode, where they default to the local stack):

CARELOG_AUTH_KEYS_DIR       signing keys, one `<kid>.pem` each (production: required)
CARELOG_JWKS_URL            the JWKS that services verify tokens with (production: required)
CARELOG_AUTH_ISSUER         `iss` of access tokens (default "carelog-auth")
CARELOG_AUTH_AUDIENCE       `aud` of access tokens (default "carelog-api")
CARELOG_AUTH_ACCESS_TTL_SECONDS   access token lifetime (default 900)
CARELOG_AUTH_REFRESH_TTL_SECONDS  refresh token lifetime (default 14 days)
CARELOG_AUTH_PORT           the auth service's port (default 4005)
CARELOG_AUTH_HASH_WORKERS   password hashes computed at once (default: half the CPUs)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import msgspec

from runtime.settings import DEVELOPMENT, Port, env_mode, load

DEV_STACK = Path(__file__).resolve().parent.parent / ".stack"

_Positive = Annotated[int, msgspec.Meta(ge=1)]


class AuthSettings(msgspec.Struct, frozen=True, kw_only=True):
    """How tokens are signed, checked and served."""

    development: bool
    keys_directory: str
    jwks_url: str
    issuer: str = "carelog-auth"
    audience: str = "carelog-api"
    access_ttl_seconds: _Positive = 900
    refresh_ttl_seconds: _Positive = 14 * 24 * 3600
    port: Port = 4005
    hash_workers: _Positive = max(1, (os.cpu_count() or 2) // 2)

    @property
    def keys_dir(self) -> Path:
        return Path(self.keys_directory)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AuthSettings:
        source = os.environ if environ is None else environ
        port = source.get("CARELOG_AUTH_PORT", "").strip() or "4005"
        return load(
            cls,
            source,
            _NAMES,
            dev_defaults={
                "CARELOG_AUTH_KEYS_DIR": str(DEV_STACK / "keys"),
                "CARELOG_JWKS_URL": f"http://127.0.0.1:{port}/auth/.well-known/jwks.json",
            },
            required=frozenset({"keys_directory", "jwks_url"}),
            development=env_mode(source) == DEVELOPMENT,
        )


_NAMES = {
    "keys_directory": "CARELOG_AUTH_KEYS_DIR",
    "jwks_url": "CARELOG_JWKS_URL",
    "issuer": "CARELOG_AUTH_ISSUER",
    "audience": "CARELOG_AUTH_AUDIENCE",
    "access_ttl_seconds": "CARELOG_AUTH_ACCESS_TTL_SECONDS",
    "refresh_ttl_seconds": "CARELOG_AUTH_REFRESH_TTL_SECONDS",
    "port": "CARELOG_AUTH_PORT",
    "hash_workers": "CARELOG_AUTH_HASH_WORKERS",
}
