"""The identity settings, read from the environment once when a process starts.

Variables (all optional in development mode, where they default to the local stack):

CARELOG_AUTH_KEYS_DIR       signing keys, one `<kid>.pem` each (production: required)
CARELOG_JWKS_URL            where services fetch the public keys (production: required)
CARELOG_AUTH_ISSUER         `iss` of access tokens (default "carelog-auth")
CARELOG_AUTH_AUDIENCE       `aud` of access tokens (default "carelog-api")
CARELOG_AUTH_ACCESS_TTL_SECONDS   access token lifetime (default 900)
CARELOG_AUTH_REFRESH_TTL_SECONDS  refresh token lifetime (default 14 days)
CARELOG_AUTH_PORT           the auth service's port (default 4005)
CARELOG_AUTH_HASH_WORKERS   password hashes computed at once (default: half the CPUs)
CARELOG_GATEWAY_DIR         where `carelog gateway-config` writes HAProxy's files
CARELOG_GATEWAY_PORT        the gateway's port (default 4004)
CARELOG_GATEWAY_CORS_ORIGINS  space-separated origins allowed by CORS ("*" in development)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ops.settings import DEVELOPMENT, SettingsError

ROOT = Path(__file__).resolve().parent.parent
DEV_STACK = ROOT / ".stack"


@dataclass(frozen=True)
class AuthSettings:
    """How tokens are signed, checked and served, and where the gateway's files live."""

    development: bool
    keys_dir: Path
    jwks_url: str
    issuer: str = "carelog-auth"
    audience: str = "carelog-api"
    access_ttl_seconds: int = 900
    refresh_ttl_seconds: int = 14 * 24 * 3600
    port: int = 4005
    hash_workers: int = 1
    gateway_dir: Path = DEV_STACK / "gateway"
    gateway_port: int = 4004
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> AuthSettings:
        source = os.environ if environ is None else environ
        development = source.get("CARELOG_ENV", "production").strip().lower() == DEVELOPMENT
        port = int(source.get("CARELOG_AUTH_PORT", 4005))
        dev = {
            "CARELOG_AUTH_KEYS_DIR": str(DEV_STACK / "keys"),
            "CARELOG_JWKS_URL": f"http://127.0.0.1:{port}/auth/.well-known/jwks.json",
            "CARELOG_GATEWAY_DIR": str(DEV_STACK / "gateway"),
            "CARELOG_GATEWAY_CORS_ORIGINS": "*",
        }

        def need(key: str) -> str:
            value = source.get(key) or (dev.get(key) if development else None)
            if not value:
                mode = "development" if development else "production"
                raise SettingsError(f"{key} is required in {mode} mode")
            return value

        return cls(
            development=development,
            keys_dir=Path(need("CARELOG_AUTH_KEYS_DIR")),
            jwks_url=need("CARELOG_JWKS_URL"),
            issuer=source.get("CARELOG_AUTH_ISSUER", "carelog-auth"),
            audience=source.get("CARELOG_AUTH_AUDIENCE", "carelog-api"),
            access_ttl_seconds=int(source.get("CARELOG_AUTH_ACCESS_TTL_SECONDS", 900)),
            refresh_ttl_seconds=int(source.get("CARELOG_AUTH_REFRESH_TTL_SECONDS", 14 * 24 * 3600)),
            port=port,
            hash_workers=int(
                source.get("CARELOG_AUTH_HASH_WORKERS", max(1, (os.cpu_count() or 2) // 2))
            ),
            gateway_dir=Path(source.get("CARELOG_GATEWAY_DIR") or dev["CARELOG_GATEWAY_DIR"]),
            gateway_port=int(source.get("CARELOG_GATEWAY_PORT", 4004)),
            cors_origins=tuple(
                source.get(
                    "CARELOG_GATEWAY_CORS_ORIGINS",
                    dev["CARELOG_GATEWAY_CORS_ORIGINS"] if development else "",
                ).split()
            ),
        )
