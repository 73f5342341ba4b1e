"""Test support: isolated databases and topics on the real services, and real processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from bootstrap.database import create_database, drop_database
from runtime.kafka import client_options, delete_topics
from runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def base_settings() -> Settings:
    env = {"CARELOG_ENV": "development", **os.environ}
    return Settings.from_env(env)


def claim_key() -> bytes:
    """The key the services of a test run key email claims under (their settings')."""
    return base_settings().claim_secret()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_own_auth(settings: Settings, keys: Path) -> tuple[Settings, dict[str, str]]:
    """`settings` for services that check tokens against an auth service of the test's own
    (on a free port, signing with the keys under `keys`), and the environment that starts
    that auth service and those services so."""
    settings = settings.with_(ports={**settings.ports, "auth": free_port()})
    settings = settings.with_(
        jwks_url=f"http://127.0.0.1:{settings.ports['auth']}/auth/.well-known/jwks.json"
    )
    env = {
        "CARELOG_AUTH_PORT": str(settings.ports["auth"]),
        "CARELOG_AUTH_KEYS_DIR": str(keys),
        "CARELOG_JWKS_URL": settings.jwks_url,
    }
    return settings, env


@contextmanager
def isolated_settings(prefix: str = "t") -> Iterator[Settings]:
    """A fresh database and topic prefix on the real servers, dropped afterwards."""
    base = base_settings()
    token = f"{prefix}{uuid.uuid4().hex[:10]}"
    settings = base.with_(
        database_url=create_database(base.database_url, token),
        topic_prefix=f"{token}.",
        ports={
            "commands": free_port(),
            "read-api": free_port(),
            "relay": free_port(),
            "projection": free_port(),
            "appointments": free_port(),
            "reactions": free_port(),
            "analytics": free_port(),
            "notifier": free_port(),
            "billing-grpc": free_port(),
            "billing-http": free_port(),
        },
    )
    try:
        yield settings
    finally:
        drop_database(base.database_url, token)
        drop_topics(settings, settings.topic_prefix)


def drop_topics(settings: Settings, prefix: str) -> None:
    """Deletes the topics a test run created (its own thread: a loop may be running here)."""
    worker = threading.Thread(target=asyncio.run, args=(delete_topics(settings, prefix),))
    worker.start()
    worker.join(30)


def env_for(settings: Settings) -> dict[str, str]:
    return {
        **os.environ,
        "CARELOG_ENV": settings.env,
        "CARELOG_DATABASE_URL": settings.database_url,
        "CARELOG_REDIS_URL": settings.redis_url,
        "CARELOG_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "CARELOG_KAFKA_SECURITY_PROTOCOL": settings.kafka_security_protocol,
        "CARELOG_KAFKA_SASL_MECHANISM": settings.kafka_sasl_mechanism,
        "CARELOG_KAFKA_USERNAME": settings.kafka_username,
        "CARELOG_KAFKA_PASSWORD": settings.kafka_password,
        "CARELOG_KAFKA_CA_FILE": settings.kafka_ca_file,
        "CARELOG_TOPIC_PREFIX": settings.topic_prefix,
        "CARELOG_CLAIM_KEY": settings.claim_key,
        "CARELOG_MASTER_KEY": settings.master_key,
        "CARELOG_COMMANDS_PORT": str(settings.ports["commands"]),
        "CARELOG_READ_API_PORT": str(settings.ports["read-api"]),
        "CARELOG_RELAY_PORT": str(settings.ports["relay"]),
        "CARELOG_PROJECTION_PORT": str(settings.ports["projection"]),
        "CARELOG_APPOINTMENTS_PORT": str(settings.ports["appointments"]),
        "CARELOG_REACTIONS_PORT": str(settings.ports["reactions"]),
        "CARELOG_ANALYTICS_PORT": str(settings.ports["analytics"]),
        "CARELOG_NOTIFIER_PORT": str(settings.ports["notifier"]),
        **{
            f"CARELOG_{name.upper().replace('-', '_')}_PORT": str(settings.ports[name])
            for name in ("billing-grpc", "billing-http")
            if name in settings.ports
        },
    }


@dataclass
class Process:
    """A carelog process started for a test; `kill()` is SIGKILL, no goodbye."""

    args: list[str]
    settings: Settings
    port_name: str
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    logs: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    """Variables added to the settings' environment (e.g. the notifier's SMTP port)."""

    def start(self, timeout: float = 60.0) -> Process:
        self.starts += 1
        log = self.log_path.with_suffix(f".{self.starts}.log")
        self.logs.append(log)
        handle = log.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "bootstrap", *self.args],
            env={**env_for(self.settings), **self.env},
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            # Its own process group: an HTTP service's worker processes go down with it.
            start_new_session=True,
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        url = f"http://127.0.0.1:{self.settings.ports[self.port_name]}/health/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.args} exited: {self.tail()}")
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.args} not ready in {timeout}s: {self.tail()}")

    def kill(self) -> None:
        """SIGKILL to the process and every worker process it started."""
        if self.popen:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)

    def stop(self) -> None:
        if self.popen and self.popen.poll() is None:
            stop_group(self.popen)

    def tail(self) -> str:
        return self.logs[-1].read_text()[-3000:] if self.logs else ""


def stop_group(popen: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """Stops a process started in a session of its own (`start_new_session=True`) and
    every process it started: SIGTERM to the group, then SIGKILL to whatever lingers (a
    worker, or a helper its master did not stop in time)."""
    if popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(popen.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(10)


async def read_topic(
    settings: Settings,
    topic: str,
    expected: int,
    timeout: float = 60.0,
    until: Callable[[list[Any]], bool] | None = None,
) -> list[Any]:
    """Every record of a topic from the start, once at least `expected` have arrived (and
    `until` holds of them: a topic other runs published to first holds more than the
    records counted)."""
    consumer = AIOKafkaConsumer(
        **client_options(settings), enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        admin = AIOKafkaAdminClient(**client_options(settings))
        await admin.start()
        try:
            (described,) = await admin.describe_topics([topic])
        finally:
            await admin.close()
        partitions = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
        assert partitions, f"topic {topic} does not exist"
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[Any] = []
        deadline = time.monotonic() + timeout
        while (len(records) < expected or (until is not None and not until(records))) and (
            time.monotonic() < deadline
        ):
            batch = await consumer.getmany(timeout_ms=500)
            for items in batch.values():
                records.extend(items)
        return records
    finally:
        await consumer.stop()


async def eventually(check: Any, timeout: float = 30.0, pause: float = 0.1) -> Any:
    """Awaits `check()` until it returns a truthy value, or fails after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(pause)
    raise AssertionError(f"condition not met in {timeout}s; last value: {last!r}")
