"""The gateway's files, composed from every service: OpenAPI documents and public keys;
and the watcher that keeps its revocation maps current.

`carelog gateway-config` and `carelog keys rotate|prune` call this; the rendering
itself is ops/gateway/generate.py's. `carelog gateway-watch` is the watcher: the
HAProxy master runs it (a `program` of its configuration), so it lives and restarts
with the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives import serialization

from auth.config import AuthSettings
from auth.keys import KeyRing
from ops.gateway import generate
from ops.gateway.generate import DEFAULT_LIMITS, GatewayConfigError, Limits, annotated
from ops.gateway.generate import write_config as write_files
from runtime.security import RevocationFeed, fetch_jwks, keys_from_jwks
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
    """The OpenAPI document of each service, as the gateway publishes it, and the AsyncAPI
    document of the Kafka topics (`events`, the same as schemas/asyncapi.json)."""
    from auth.app import create_app as auth_app
    from bootstrap.asyncapi import document as events_document
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
    return {
        "patients": patients,
        "auth": annotated(auth_app(settings, auth)),
        "events": events_document(),
    }


def write_config(
    settings: Settings,
    auth: AuthSettings,
    jwks_url: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Path:
    """Writes the gateway's files from the current keys and documents; the path of haproxy.cfg."""
    return write_files(settings, public_keys(auth, jwks_url), api_documents(settings, auth), limits)


RESYNC_SECONDS = 30.0
"""How often the watcher pushes the whole maps even without a change (a repair)."""

log = structlog.get_logger(__name__)


async def watch(settings: Settings, directory: str | None = None) -> None:
    """Follows the revocations (the same feed as the services) and, after each change,
    rewrites the gateway's map files and replaces the maps in the running HAProxy; until
    the process that started it (the HAProxy master) is gone."""
    out = Path(directory or settings.gateway_dir)
    changed = asyncio.Event()
    feed = RevocationFeed(settings.database_url, on_change=changed.set)
    follower = asyncio.create_task(feed.run(), name="revocation-feed")
    master = os.getppid()
    pushed_at = -RESYNC_SECONDS
    failing = False
    try:
        while os.getppid() == master:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 1.0)
            due = changed.is_set() or time.monotonic() - pushed_at >= RESYNC_SECONDS
            if not feed.loaded.is_set() or not due:
                continue  # never push an empty list over the one HAProxy read from the files
            changed.clear()
            maps = generate.revocation_maps(feed.revocations.entries())
            try:
                generate.write_maps(out, maps)
                await generate.push_maps(out, maps)
            except OSError as exc:
                if not failing:
                    log.warning("revocation maps not pushed", error=str(exc))
                failing = True
                changed.set()
                await asyncio.sleep(0.5)
                continue
            if failing:
                log.info("revocation maps pushed again")
            failing = False
            pushed_at = time.monotonic()
    finally:
        follower.cancel()
