"""The `carelog` command: runs each process and the operator's tools.

carelog serve commands     the command API (port 4000)
carelog serve read-api     the query API (port 4003)
carelog relay              event store → Kafka (health on 4010)
carelog project directory  the patient directory projection (health on 4011)
carelog topics             creates the Kafka topics
carelog schemas write|check  the JSON Schemas of published events
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import structlog

from ops.logs import configure_logging
from ops.settings import Settings, SettingsError

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"

log = structlog.get_logger("carelog")


def _settings(service: str) -> Settings:
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"carelog {service}: {exc}")
    configure_logging(settings.log_level, service)
    return settings


def serve(which: str) -> None:
    from ops.http import serve as run_http

    settings = _settings(which)
    if which == "commands":
        from commands.api import create_app as commands_app

        run_http(commands_app(settings), settings.http_host, settings.ports["commands"])
    else:
        from read_api.app import create_app as read_app

        run_http(read_app(settings), settings.http_host, settings.ports["read-api"])


async def _relay(settings: Settings) -> None:
    import anyio

    from commands.relay import Relay
    from commands.store import EventStore
    from ops.http import serve_health
    from ops.kafka import ensure_topics, reliable_producer, wait_for_kafka

    store = await anyio.to_thread.run_sync(lambda: EventStore(settings.database_url, pool_size=2))
    await wait_for_kafka(settings.kafka_bootstrap)
    producer = reliable_producer(settings.kafka_bootstrap)
    await producer.start()
    relay = Relay(store, producer, settings.database_url, topic_prefix=settings.topic_prefix)
    await ensure_topics(settings.kafka_bootstrap, relay.topics)

    async def following() -> None:
        if time.monotonic() - relay.last_cycle > 10:
            raise TimeoutError("no relay cycle completed in the last 10 s")

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.stop)
    server = await serve_health({"relay": following}, settings.http_host, settings.ports["relay"])
    try:
        await relay.run()
    finally:
        server.should_exit = True
        await producer.stop()
        store.close()


def schemas(action: str) -> int:
    from domain.contracts import json_schemas

    wanted = {
        name: json.dumps(s, indent=2, sort_keys=True) + "\n" for name, s in json_schemas().items()
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
    serve_p.add_argument("service", choices=["commands", "read-api"])
    sub.add_parser("relay", help="publish the event store to Kafka")
    project_p = sub.add_parser("project", help="run a projection")
    project_p.add_argument("projection", choices=["directory"])
    sub.add_parser("topics", help="create the Kafka topics")
    schemas_p = sub.add_parser("schemas", help="write or check the event JSON Schemas")
    schemas_p.add_argument("action", choices=["write", "check"])
    args = parser.parse_args(argv)

    if args.command == "serve":
        serve(args.service)
    elif args.command == "relay":
        asyncio.run(_relay(_settings("relay")))
    elif args.command == "project":
        from projections.worker import run_directory

        asyncio.run(run_directory(_settings("projection")))
    elif args.command == "topics":
        from domain.contracts import CONTRACTS
        from ops.kafka import ensure_topics

        settings = _settings("topics")
        names = sorted({settings.topic(c.stream) for c in CONTRACTS.values()})
        asyncio.run(ensure_topics(settings.kafka_bootstrap, names))
        print("topics:", ", ".join(names))
    elif args.command == "schemas":
        sys.exit(schemas(args.action))
