"""The `carelog` command: runs each process and the operator's tools.

carelog serve commands     the command API (port 4000)
carelog serve read-api     the query API (port 4003)
carelog serve auth         the auth service (port 4005)
carelog gateway-config     renders the HAProxy gateway's files (--reload: reload HAProxy)
carelog keys list|rotate|prune  the token signing keys
carelog serve billing      billing over gRPC (port 9001; health on 4001)
carelog relay              event store → Kafka (health on 4010)
carelog project directory  the patient directory projection (health on 4011)
carelog project appointments  the appointments projection (health on 4012)
carelog react patient-removals  cancels removed patients' appointments (health on 4013)
carelog topics             creates the Kafka topics
carelog schemas write|check  the JSON Schemas of published events
carelog db migrate|status  the database schema's versioned migrations
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from runtime.logs import configure_logging
from runtime.settings import Settings, SettingsError, read_env_file

if TYPE_CHECKING:
    from auth.config import AuthSettings

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"

log = structlog.get_logger("carelog")


ROOT = Path(__file__).resolve().parent.parent
DEV_ENV = ROOT / "ops" / "local" / "dev.env"


def _environ() -> dict[str, str]:
    """The environment; in a checkout whose local stack is up (and CARELOG_ENV unset), the
    stack's development settings fill in what the environment does not say."""
    if "CARELOG_ENV" not in os.environ and DEV_ENV.exists() and (ROOT / ".stack").is_dir():
        return {**read_env_file(DEV_ENV), **os.environ}
    return dict(os.environ)


def _settings(service: str) -> Settings:
    try:
        settings = Settings.from_env(_environ())
    except SettingsError as exc:
        sys.exit(f"carelog {service}: {exc}")
    configure_logging(settings.log_level, service)
    return settings


def _auth_settings(service: str) -> AuthSettings:
    from auth.config import AuthSettings

    try:
        return AuthSettings.from_env(_environ())
    except SettingsError as exc:
        sys.exit(f"carelog {service}: {exc}")


def gateway_config(reload: bool, jwks_url: str | None) -> int:
    from bootstrap.gateway import write_config
    from ops.gateway import generate as gateway

    settings = _settings("gateway-config")
    auth = _auth_settings("gateway-config")
    try:
        path = write_config(settings, auth, jwks_url)
    except (gateway.GatewayConfigError, SettingsError, OSError) as exc:
        print(f"carelog gateway-config: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {path}")
    if reload:
        print("haproxy reloaded" if gateway.reload(settings) else "haproxy is not running")
    return 0


def keys(action: str) -> int:
    """Lists, rotates (add, publish, reload the gateway, then sign) or prunes the keys."""
    from auth import keys as keyring

    auth = _auth_settings("keys")
    ring = keyring.KeyRing(auth.keys_dir).ensure(development=auth.development)
    if action == "list":
        for kid in ring.keys:
            print(kid, "(signing)" if kid == ring.current_kid else "")
        return 0
    if action == "rotate":
        kid = keyring.add_key(auth.keys_dir)
        if gateway_config(reload=True, jwks_url=None):
            return 1
        time.sleep(2)  # the auth service and the reloaded gateway pick the key up
        keyring.promote(auth.keys_dir, kid)
        print(f"signing with {kid}; older keys stay published until pruned")
        return 0
    removed = keyring.prune(auth.keys_dir, auth.access_ttl_seconds + 60)
    print("removed:", ", ".join(removed) or "nothing")
    return gateway_config(reload=True, jwks_url=None) if removed else 0


def serve(which: str) -> None:
    settings = _settings(which)
    _require_migrated(settings, which)
    if which == "billing":
        from billing_grpc.config import BillingConfig
        from bootstrap import billing

        try:
            config = BillingConfig.from_env(_environ())
        except SettingsError as exc:
            sys.exit(f"carelog billing: {exc}")
        asyncio.run(billing.run(settings, config))
    elif which == "commands":
        from bootstrap import commands

        commands.run(settings)
    elif which == "auth":
        from bootstrap import auth

        auth.run(settings, _auth_settings(which))
    else:
        from bootstrap import read_api

        read_api.run(settings)


def _require_migrated(settings: Settings, service: str) -> None:
    """Stops a service whose database lacks a migration (it would fail later, less clearly)."""
    from bootstrap.database import DatabaseBehind, require_current

    try:
        require_current(settings.database_url)
    except DatabaseBehind as exc:
        sys.exit(f"carelog {service}: {exc}")
    except Exception as exc:
        log.warning("database schema not checked", error=type(exc).__name__)


def db(action: str) -> int:
    from bootstrap import database

    settings = _settings("db")
    try:
        if action == "migrate":
            applied = database.migrate(settings.database_url)
            print("applied:", ", ".join(applied) if applied else "nothing (up to date)")
            return 0
        rows = database.status(settings.database_url)
    except Exception as exc:
        print(f"carelog db {action}: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        return 1
    for row in rows:
        when = (
            row.applied_at.isoformat(sep=" ", timespec="seconds") if row.applied_at else "pending"
        )
        print(f"{row.id:<24} {when}")
    return 1 if any(r.applied_at is None for r in rows) else 0


def schemas(action: str) -> int:
    from domain.billing import billing_json_schemas
    from domain.contracts import json_schemas

    wanted = {
        name: json.dumps(s, indent=2, sort_keys=True) + "\n"
        for name, s in {**json_schemas(), **billing_json_schemas()}.items()
    }
    if action == "write":
        for name, text in wanted.items():
            path = SCHEMAS_DIR / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path.relative_to(SCHEMAS_DIR.parent)}")
        return 0
    stale = [
        n
        for n, text in wanted.items()
        if not (SCHEMAS_DIR / n).exists() or (SCHEMAS_DIR / n).read_text() != text
    ]
    for name in stale:
        print(f"schemas/{name} differs from the code: run `make schemas`", file=sys.stderr)
    return 1 if stale else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="carelog", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve", help="run an HTTP API")
    serve_p.add_argument("service", choices=["commands", "read-api", "billing", "auth"])
    gateway_p = sub.add_parser("gateway-config", help="render the HAProxy gateway's files")
    gateway_p.add_argument("--reload", action="store_true", help="then reload HAProxy")
    gateway_p.add_argument("--jwks-url", help="trust these keys (default: the key directory)")
    keys_p = sub.add_parser("keys", help="list, rotate or prune the token signing keys")
    keys_p.add_argument("action", choices=["list", "rotate", "prune"])
    sub.add_parser("relay", help="publish the event store to Kafka")
    project_p = sub.add_parser("project", help="run a projection")
    project_p.add_argument("projection", choices=["directory", "appointments"])
    react_p = sub.add_parser("react", help="run a process manager")
    react_p.add_argument("reaction", choices=["patient-removals"])
    sub.add_parser("topics", help="create the Kafka topics")
    schemas_p = sub.add_parser("schemas", help="write or check the event JSON Schemas")
    schemas_p.add_argument("action", choices=["write", "check"])
    db_p = sub.add_parser("db", help="apply or list the database migrations")
    db_p.add_argument("action", choices=["migrate", "status"])
    args = parser.parse_args(argv)

    if args.command == "serve":
        serve(args.service)
    elif args.command == "relay":
        from bootstrap import relay

        settings = _settings("relay")
        _require_migrated(settings, "relay")
        asyncio.run(relay.run(settings))
    elif args.command == "project":
        from bootstrap import directory

        settings = _settings(f"project {args.projection}")
        _require_migrated(settings, f"project {args.projection}")
        if args.projection == "appointments":
            asyncio.run(directory.run_appointments(settings))
        else:
            asyncio.run(directory.run(settings))
    elif args.command == "react":
        from bootstrap import directory

        settings = _settings("react patient-removals")
        _require_migrated(settings, "react patient-removals")
        asyncio.run(directory.run_patient_removals(settings))
    elif args.command == "topics":
        from domain.contracts import CONTRACTS
        from runtime.kafka import ensure_topics

        settings = _settings("topics")
        names = sorted({settings.topic(c.stream) for c in CONTRACTS.values()})
        asyncio.run(ensure_topics(settings.kafka_bootstrap, names))
        print("topics:", ", ".join(names))
    elif args.command == "gateway-config":
        sys.exit(gateway_config(args.reload, args.jwks_url))
    elif args.command == "keys":
        sys.exit(keys(args.action))
    elif args.command == "schemas":
        sys.exit(schemas(args.action))
    elif args.command == "db":
        sys.exit(db(args.action))
