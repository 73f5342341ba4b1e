"""The gateway's files, composed from every service: OpenAPI documents and public keys.

`carelog gateway-config` and `carelog keys rotate|prune` call this; the rendering
itself is ops/gateway/generate.py's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from auth.config import AuthSettings
from auth.keys import KeyRing
from ops.gateway.generate import GatewayConfigError, annotated
from ops.gateway.generate import write_config as write_files
from runtime.security import fetch_jwks, keys_from_jwks
from runtime.settings import Settings


def public_keys(auth: AuthSettings, jwks_url: str | None = None) -> dict[str, bytes]:
    """PEM public keys by kid: from a JWKS URL, else from the key directory."""
    if jwks_url:
        keys = keys_from_jwks(fetch_jwks(jwks_url))
    else:
        ring = KeyRing(auth.keys_dir).ensure(development=auth.development)
        keys = {kid: key.public_key for kid, key in ring.keys.items()}
    if not keys:
        raise GatewayConfigError("no public keys to trust")
    pems = {}
    for kid, key in sorted(keys.items()):
        pems[kid] = key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return pems


def api_documents(settings: Settings, auth: AuthSettings) -> dict[str, dict[str, Any]]:
    """The OpenAPI document of each service, as the gateway publishes it."""
    from auth.app import create_app as auth_app
    from commands.api import create_app as commands_app
    from read_api.app import create_app as read_app

    reads = annotated(read_app(settings), "/api")
    writes = annotated(commands_app(settings), "/api")
    patients = dict(reads)
    patients["info"] = {
        "title": "carelog patients",
        "version": reads["info"]["version"],
        "description": "Patients: reads from the query API, writes to the command API.",
    }
    patients["paths"] = {**writes["paths"]}
    for path, operations in reads["paths"].items():
        patients["paths"].setdefault(path, {}).update(operations)
    for key, value in writes.get("components", {}).items():
        patients["components"].setdefault(key, {}).update(value)
    patients["tags"] = writes.get("tags", [])
    return {"patients": patients, "auth": annotated(auth_app(settings, auth))}


def write_config(settings: Settings, auth: AuthSettings, jwks_url: str | None = None) -> Path:
    """Writes the gateway's files from the current keys and documents; the path of haproxy.cfg."""
    return write_files(settings, public_keys(auth, jwks_url), api_documents(settings, auth))
