"""The `carelog` command: runs each process and the operator's tools.

carelog serve commands     the command API (port 4000)
carelog serve read-api     the query API (port 4003)
carelog serve auth         the auth service (port 4005)
carelog gateway-config     renders the HAProxy gateway's files (--reload: reload HAProxy)
carelog gateway-watch      keeps the gateway's revocation maps current (HAProxy runs it)
carelog keys list|rotate|prune  the token signing keys
carelog serve billing      billing over gRPC (port 9001; health on 4001)
carelog relay              event store → Kafka (health on 4010)
carelog project directory  the patient directory projection (health on 4011)
carelog project appointments  the appointments projection (health on 4012)
carelog project analytics  the analytics projection (health on 4014)
carelog notify             emails patients from events, exactly once each (health on 4015)
carelog react patient-removals  cancels removed patients' appointments (health on 4013)
carelog topics             creates the Kafka topics
carelog schemas write|check  the JSON Schemas of published events, and their AsyncAPI
carelog db migrate|status  the database schema's versioned migrations (migrate also rekeys)
carelog claims rekey       moves email claims to ids keyed under CARELOG_CLAIM_KEY
carelog projections list|rebuild|rollback|drop-old|discard  rebuild read models from the store
carelog history patient|appointment|clinician ID  an aggregate's events, personal data redacted
carelog dlq list|show ID|replay ID|--all  the events the read models' consumers set aside
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from runtime.logs import configure_logging
from runtime.loop import run_service
from runtime.settings import Settings, SettingsError, read_env_file
from runtime.tracing import configure_tracing

if TYPE_CHECKING:
    from auth.config import AuthSettings

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"
ASYNCAPI_FILE = "asyncapi.json"
"""The AsyncAPI document of the Kafka topics, in SCHEMAS_DIR."""

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
    configure_tracing(settings.otlp_endpoint, service)
    return settings


def worker_settings(service: str) -> Settings:
    """A served app's settings, in each of its worker processes (logging set up too)."""
    return _settings(service)


def auth_settings(service: str) -> AuthSettings:
    """The auth service's own settings, in each of its worker processes."""
    return _auth_settings(service)


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


_WORKERS = {"commands": "commands_workers", "read-api": "read_api_workers", "auth": "auth_workers"}


def _share_metrics(settings: Settings, which: str) -> None:
    """With several worker processes, every metric lives in files they share
    (prometheus_client's multiprocess mode), so a scrape answered by any worker counts
    them all. It must be set before anything imports prometheus_client."""
    workers: int = getattr(settings, _WORKERS.get(which, ""), 1)
    if workers < 2 or "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        return
    directory = tempfile.mkdtemp(prefix=f"carelog-{which}-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    atexit.register(shutil.rmtree, directory, ignore_errors=True)


def serve(which: str) -> None:
    settings = _settings(which)
    _require_migrated(settings, which)
    # The HTTP services' worker processes read their settings from the environment
    # they inherit: hand them what this process read (the stack's defaults included).
    os.environ.update(_environ())
    _share_metrics(settings, which)
    if which == "billing":
        from billing_grpc.config import BillingConfig
        from bootstrap import billing

        try:
            config = BillingConfig.from_env(_environ())
        except SettingsError as exc:
            sys.exit(f"carelog billing: {exc}")
        run_service(billing.run(settings, config))
    elif which == "commands":
        from bootstrap import commands

        _require_claim_key(settings, which)
        commands.run(settings)
    elif which == "auth":
        from bootstrap import auth

        auth.run(settings, _auth_settings(which))
    else:
        from bootstrap import read_api

        try:
            read_api.run(settings)
        except SettingsError as exc:
            sys.exit(f"carelog {which}: {exc}")


def _require_claim_key(settings: Settings, service: str) -> None:
    """Stops the command API without a claim key, or over claims it cannot see (unkeyed, or
    keyed under another key)."""
    from commands.claims import ClaimsNotReady, require_ready

    try:
        key = settings.claim_secret()
    except SettingsError as exc:
        sys.exit(f"carelog {service}: {exc}")
    try:
        require_ready(settings.database_url, key)
    except ClaimsNotReady as exc:
        sys.exit(f"carelog {service}: {exc}: run `carelog db migrate` (or `carelog claims rekey`)")
    except Exception as exc:  # the database is away: the service retries and says so
        log.warning("email claims not checked", error=type(exc).__name__)


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
            return _rekey_if_needed(settings)
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


def claims(action: str) -> int:
    settings = _settings("claims")
    _require_migrated(settings, "claims")
    return _rekey(settings)


def _rekey_if_needed(settings: Settings) -> int:
    """After the migrations: rekeys the claims if unkeyed ones remain (a store from before
    keyed claims) or they are keyed under another key (CARELOG_CLAIM_KEY changed)."""
    from commands.claims import not_ready

    if not settings.claim_key:
        print("claims: not checked (no CARELOG_CLAIM_KEY)")
        return 0
    reason = not_ready(settings.database_url, settings.claim_secret())
    if reason is None:
        print("claims: keyed under CARELOG_CLAIM_KEY")
        return 0
    print(f"claims: {reason}: rekeying")
    return _rekey(settings)


def _rekey(settings: Settings) -> int:
    """Runs `commands.claims.rekey`; says what it did in one line (ids, never emails)."""
    from commands.claims import rekey
    from commands.store import EventStore
    from runtime.crypto import Keyring

    try:
        key = settings.claim_secret()
    except SettingsError as exc:
        print(f"carelog claims rekey: {exc}", file=sys.stderr)
        return 1
    # The keyring opens each patient's sealed email, which the claim is keyed over.
    store = EventStore(settings.database_url, keyring=Keyring.from_settings(settings))
    try:
        done = rekey(
            store,
            settings.database_url,
            key,
            lambda done, of: print(f"claims: {done}/{of} patients", file=sys.stderr),
        )
    finally:
        store.close()
    print(
        f"claims: {done.patients} patient(s) looked at, {done.taken} keyed claim(s) taken,"
        f" {done.deleted} old claim row(s) deleted"
    )
    for patient_id in done.conflicts:
        print(f"claims: patient {patient_id}'s email is held by another patient", file=sys.stderr)
    return 1 if done.conflicts else 0


def projections(args: argparse.Namespace) -> int:
    from bootstrap import rebuild
    from bootstrap.progress import events_progress
    from commands.store import EventStore
    from runtime.crypto import Keyring

    settings = _settings("projections")
    _require_migrated(settings, "projections")
    store = EventStore(settings.database_url, 2, keyring=Keyring.from_settings(settings))
    try:
        if args.action == "list":
            rows = asyncio.run(rebuild.status(settings, store))
            if args.json:
                print(json.dumps(rows))
                return 0
            head = ("NAME", "STATE", "POSITION", "LAG", "LAG S", "DLQ")
            print("{:<14}{:<12}{:>10}{:>8}{:>8}{:>6}  VERSION".format(*head))
            for r in rows:
                print(
                    f"{r['name']:<14}{r['state']:<12}{r['position']:>10}{r['lagEvents']:>8}"
                    f"{r['lagSeconds']:>8}{r['deadLettered']:>6}  {r['version']}"
                    + ("  (old copy kept)" if r["oldCopyKept"] else "")
                )
            return 0
        if args.name is None:
            print(f"carelog projections {args.action}: name a read model", file=sys.stderr)
            return 2
        if args.action in ("drop-old", "discard"):
            discard = args.action == "discard"
            dropped = asyncio.run(rebuild.drop_old(settings, args.name, rebuilding=discard))
            print("dropped:", ", ".join(dropped) or "nothing (no such copy)")
            return 0
        if args.action == "rollback":
            report = asyncio.run(rebuild.rollback(settings, store, args.name))
            print(
                report.as_json() if args.json else f"{args.name}: rolled back at {report.position}"
            )
            return 0
        interactive = sys.stdin.isatty() and sys.stderr.isatty()
        if not (args.yes or args.dry_run or interactive):
            print(
                "carelog projections rebuild: no terminal to confirm on; pass --yes",
                file=sys.stderr,
            )
            return 2

        def confirm(question: str) -> bool:
            if args.yes:
                return True
            return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")

        with events_progress(f"rebuild {args.name}") as progress:
            report = asyncio.run(
                rebuild.rebuild(
                    settings,
                    store,
                    args.name,
                    progress=progress,
                    dry_run=args.dry_run,
                    confirm=confirm,
                    duty=args.duty if args.duty is not None else rebuild.DEFAULT_DUTY,
                    allow_differences=args.allow_differences,
                )
            )
        if args.json:
            print(report.as_json())
        elif not args.dry_run:
            print(
                f"{args.name}: rebuilt from {report.events} events (resumed at"
                f" {report.resumed_from}), equal to the live model, swapped in at position"
                f" {report.position}; the old tables are kept until"
                f" `carelog projections drop-old {args.name}`"
            )
        return 0
    except rebuild.ParityMismatch as exc:
        print(f"carelog projections {args.action}: {exc}; nothing swapped", file=sys.stderr)
        return 3
    except rebuild.RebuildError as exc:
        print(f"carelog projections {args.action}: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()


def dlq(args: argparse.Namespace) -> int:
    from bootstrap import dlq as letters

    settings = _settings("dlq")
    try:
        if args.action == "list":
            found = asyncio.run(letters.letters(settings, args.topic))
            for letter in found:
                print(json.dumps(letter.summary()))
            if not found:
                print("no dead letters", file=sys.stderr)
            return 0
        if args.action == "show":
            if not args.id:
                return letters.fail("show needs an id (see `carelog dlq list`)")
            print(letters.show(settings, asyncio.run(letters.find(settings, args.id)), args.reveal))
            return 0
        if args.all:
            chosen = asyncio.run(letters.letters(settings, args.topic))
        elif args.id:
            chosen = [asyncio.run(letters.find(settings, args.id))]
        else:
            return letters.fail("replay needs an id or --all")
        outcomes = asyncio.run(letters.replay(settings, chosen))
        for letter_id, outcome in outcomes.items():
            print(f"{letter_id}: {outcome}")
        return (
            0 if all(not o.startswith(("still", "undecodable")) for o in outcomes.values()) else 1
        )
    except letters.DlqError as exc:
        return letters.fail(str(exc))


def history(kind: str, ident: str, reveal: bool) -> int:
    from bootstrap.history import print_history

    settings = _settings("history")
    return print_history(settings, kind, ident, reveal)


def schemas(action: str) -> int:
    """Writes (or checks) schemas/: each event's JSON Schema and the topics' AsyncAPI document."""
    from bootstrap.asyncapi import document
    from domain.billing import billing_json_schemas
    from domain.contracts import json_schemas

    generated = {**json_schemas(), **billing_json_schemas(), ASYNCAPI_FILE: document()}
    wanted = {name: json.dumps(s, indent=2, sort_keys=True) + "\n" for name, s in generated.items()}
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
    watch_p = sub.add_parser("gateway-watch", help="keep the gateway's revocation maps current")
    watch_p.add_argument("--dir", help="the gateway's directory (default: CARELOG_GATEWAY_DIR)")
    keys_p = sub.add_parser("keys", help="list, rotate or prune the token signing keys")
    keys_p.add_argument("action", choices=["list", "rotate", "prune"])
    sub.add_parser("relay", help="publish the event store to Kafka")
    project_p = sub.add_parser("project", help="run a projection")
    project_p.add_argument("projection", choices=["directory", "appointments", "analytics"])
    sub.add_parser("notify", help="run the notifier")
    react_p = sub.add_parser("react", help="run a process manager")
    react_p.add_argument("reaction", choices=["patient-removals"])
    sub.add_parser("topics", help="create the Kafka topics")
    schemas_p = sub.add_parser("schemas", help="write or check the event JSON Schemas and AsyncAPI")
    schemas_p.add_argument("action", choices=["write", "check"])
    proj_p = sub.add_parser("projections", help="list or rebuild the read models")
    proj_p.add_argument("action", choices=["list", "rebuild", "rollback", "drop-old", "discard"])
    proj_p.add_argument("name", nargs="?", help="directory or appointments")
    proj_p.add_argument("--dry-run", action="store_true", help="say what would happen")
    proj_p.add_argument("--yes", action="store_true", help="do not ask before swapping")
    proj_p.add_argument("--json", action="store_true", help="a JSON summary on stdout")
    proj_p.add_argument(
        "--duty",
        type=float,
        default=None,
        help="share of the time the rebuild works (the rest it pauses; default 0.25)",
    )
    proj_p.add_argument(
        "--allow-differences",
        action="store_true",
        help="swap even if the copy differs (the projection's code changed on purpose)",
    )
    hist_p = sub.add_parser("history", help="an aggregate's events, in order")
    hist_p.add_argument("kind", choices=["patient", "appointment", "clinician"])
    hist_p.add_argument("id")
    hist_p.add_argument("--reveal", action="store_true", help="show personal data (audited)")
    dlq_p = sub.add_parser("dlq", help="list, show or replay dead-lettered events")
    dlq_p.add_argument("action", choices=["list", "show", "replay"])
    dlq_p.add_argument("id", nargs="?", help="a dead letter's id, <model>:<offset>")
    dlq_p.add_argument("--topic", help="only this dead-letter topic (or model name)")
    dlq_p.add_argument("--all", action="store_true", help="replay every dead letter")
    dlq_p.add_argument("--reveal", action="store_true", help="show the body (audited)")
    db_p = sub.add_parser("db", help="apply or list the database migrations")
    db_p.add_argument("action", choices=["migrate", "status"])
    claims_p = sub.add_parser("claims", help="move email claims to keyed ids")
    claims_p.add_argument("action", choices=["rekey"])
    args = parser.parse_args(argv)

    if args.command == "serve":
        serve(args.service)
    elif args.command == "relay":
        from bootstrap import relay

        settings = _settings("relay")
        _require_migrated(settings, "relay")
        run_service(relay.run(settings))
    elif args.command == "project":
        from bootstrap import directory

        settings = _settings(f"project {args.projection}")
        _require_migrated(settings, f"project {args.projection}")
        if args.projection == "appointments":
            run_service(directory.run_appointments(settings))
        elif args.projection == "analytics":
            run_service(directory.run_analytics(settings))
        else:
            run_service(directory.run(settings))
    elif args.command == "notify":
        from bootstrap import notifier
        from notifications.config import NotifierConfig

        settings = _settings("notify")
        _require_migrated(settings, "notify")
        try:
            config = NotifierConfig.from_env(_environ())
        except SettingsError as exc:
            sys.exit(f"carelog notify: {exc}")
        run_service(notifier.run(settings, config))
    elif args.command == "react":
        from bootstrap import directory

        settings = _settings("react patient-removals")
        _require_migrated(settings, "react patient-removals")
        run_service(directory.run_patient_removals(settings))
    elif args.command == "topics":
        from domain.contracts import CONTRACTS
        from runtime.kafka import ensure_topics

        settings = _settings("topics")
        names = sorted({settings.topic(c.stream) for c in CONTRACTS.values()})
        asyncio.run(ensure_topics(settings, names))
        print("topics:", ", ".join(names))
    elif args.command == "gateway-config":
        sys.exit(gateway_config(args.reload, args.jwks_url))
    elif args.command == "gateway-watch":
        from bootstrap import gateway

        asyncio.run(gateway.watch(_settings("gateway-watch"), args.dir))
    elif args.command == "keys":
        sys.exit(keys(args.action))
    elif args.command == "schemas":
        sys.exit(schemas(args.action))
    elif args.command == "db":
        sys.exit(db(args.action))
    elif args.command == "claims":
        sys.exit(claims(args.action))
    elif args.command == "projections":
        sys.exit(projections(args))
    elif args.command == "dlq":
        sys.exit(dlq(args))
    elif args.command == "history":
        sys.exit(history(args.kind, args.id, args.reveal))
