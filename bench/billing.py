"""Benchmark of billing: GetBillingAccount throughput and latency, and event-to-account lag.

    uv run python -m bench.billing      (needs PostgreSQL and Kafka; CARELOG_ENV etc.)

It starts its own billing process (`python -m bootstrap serve billing`) on free ports,
with a scratch topic prefix and a scratch PostgreSQL database (migrated), so it neither
reads nor writes the live stack's billing; both are deleted afterwards. Its calls carry
the development admin's access token, so the stack's auth service must be running
(CARELOG_AUTH_URL, default http://127.0.0.1:4005); the billing process verifies tokens
with that service's JWKS.

- Lag: PatientRegistered envelopes are published to the scratch patient topic at
  a steady rate, as the relay would publish them; the lag of each is the time
  from the event's `occurredAt` to the commit of its open account (both stamped
  on this machine's clock), read back from the account rows.
- GetBillingAccount: a grpclib client in this process keeps CONCURRENCY calls in
  flight over CHANNELS HTTP/2 connections for a fixed number of calls; the floor
  is grpc.health.v1.Health/Check (a bare endpoint of the same server, its check
  cached) with the same client and concurrency, so the ratio shows what the
  method itself costs beyond gRPC and the Python client.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import msgspec
import psycopg
from aiokafka.admin import AIOKafkaAdminClient
from grpclib.client import Channel
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest

import billing_grpc.generated.carelog.billing.v1 as pb
from bench.common import main_for, token_headers
from bench.loadgen import percentile
from bootstrap.database import migrate
from domain import contracts
from runtime.kafka import client_options, ensure_topics, reliable_producer
from runtime.settings import Settings

ROOT = Path(__file__).resolve().parent.parent

PATIENTS = 400
"""Accounts opened from events (also the pool of accounts the reads pick from)."""
EVENTS_PER_SECOND = 200
CONCURRENCY = 32
CHANNELS = 4
CALLS = 6_000
WARMUP_CALLS = 500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _registered(patient_id: uuid.UUID) -> bytes:
    envelope = contracts.envelope(
        contracts.PatientRegisteredV1(
            name="Bench Patient",
            email=f"bench-{patient_id.hex[:12]}@bench.carelog.invalid",
            address="1 Bench Street",
            date_of_birth=date(1980, 1, 1),
            registered_date=date(2025, 1, 1),
        ),
        aggregate_id=patient_id,
        aggregate_version=1,
        position=1,
        occurred_at=datetime.now(UTC),
    )
    return msgspec.json.encode(envelope)


class _Billing:
    """The billing process under test, on scratch topics, database and ports."""

    def __init__(self, settings: Settings, token: str, auth_url: str):
        self.admin_url = settings.database_url
        self.database = token
        self.settings = settings.with_(
            topic_prefix=f"{settings.topic_prefix}{token}.",
            database_url=urlunsplit(urlsplit(settings.database_url)._replace(path=f"/{token}")),
            jwks_url=f"{auth_url}/auth/.well-known/jwks.json",
        )
        self.grpc_port = _free_port()
        self.http_port = _free_port()
        self.popen: subprocess.Popen[bytes] | None = None

    def env(self) -> dict[str, str]:
        s = self.settings
        return {
            **os.environ,
            "CARELOG_ENV": s.env,
            "CARELOG_DATABASE_URL": s.database_url,
            "CARELOG_REDIS_URL": s.redis_url,
            "CARELOG_KAFKA_BOOTSTRAP": s.kafka_bootstrap,
            "CARELOG_TOPIC_PREFIX": s.topic_prefix,
            "CARELOG_JWKS_URL": s.jwks_url,
            "CARELOG_LOG_LEVEL": "warning",
            "CARELOG_BILLING_GRPC_PORT": str(self.grpc_port),
            "CARELOG_BILLING_HTTP_PORT": str(self.http_port),
        }

    async def start(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.admin_url, autocommit=True) as db:
            await db.execute(f'CREATE DATABASE "{self.database}"')
        await asyncio.to_thread(migrate, self.settings.database_url)
        self.popen = subprocess.Popen(  # noqa: ASYNC220 (started once, waited on below)
            [sys.executable, "-m", "bootstrap", "serve", "billing"],
            env=self.env(),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 90
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if self.popen.poll() is not None:
                    raise RuntimeError("the billing process exited while starting")
                try:
                    ready = await client.get(f"http://127.0.0.1:{self.http_port}/health/ready")
                    if ready.status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError("the billing process did not become ready in 90 s")

    async def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()
            try:
                await asyncio.to_thread(self.popen.wait, 20)
            except subprocess.TimeoutExpired:
                self.popen.kill()

    async def clean_up(self) -> None:
        async with await psycopg.AsyncConnection.connect(self.admin_url, autocommit=True) as db:
            await db.execute(f'DROP DATABASE IF EXISTS "{self.database}" WITH (FORCE)')
        admin = AIOKafkaAdminClient(**client_options(self.settings))
        await admin.start()
        try:
            topics = set(await admin.list_topics())
            mine = [t for t in topics if t.startswith(self.settings.topic_prefix)]
            if mine:
                await admin.delete_topics(mine)
        finally:
            await admin.close()


async def _lag(billing: _Billing) -> tuple[list[float], list[uuid.UUID]]:
    """Publishes PATIENTS registrations at EVENTS_PER_SECOND; returns each one's lag (s)."""
    settings = billing.settings
    topic = settings.topic(contracts.PATIENT_STREAM)
    await ensure_topics(settings, [topic])
    producer = reliable_producer(settings)
    await producer.start()
    patients = [uuid.uuid4() for _ in range(PATIENTS)]
    try:
        started = time.monotonic()
        for i, patient_id in enumerate(patients):
            await producer.send(topic, _registered(patient_id), key=str(patient_id).encode())
            pause = started + (i + 1) / EVENTS_PER_SECOND - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
        await producer.flush()
    finally:
        await producer.stop()
    query = (
        "SELECT extract(epoch FROM opened_at - registered_at) FROM billing.accounts"
        " WHERE patient_id = ANY(%s)"
    )
    deadline = time.monotonic() + 120
    async with await psycopg.AsyncConnection.connect(settings.database_url) as db:
        while True:
            rows = await (await db.execute(query, [patients])).fetchall()
            await db.rollback()
            if len(rows) == len(patients):
                return [float(row[0]) for row in rows], patients
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(rows)} of {len(patients)} accounts opened")
            await asyncio.sleep(0.2)


async def _load(call: Callable[[int], Awaitable[Any]], calls: int) -> tuple[float, list[float]]:
    """Runs `calls` calls with CONCURRENCY in flight; returns (calls/s, latencies in s)."""
    latencies: list[float] = []
    next_call = 0

    async def worker() -> None:
        nonlocal next_call
        while next_call < calls:
            i = next_call
            next_call += 1
            begun = time.perf_counter()
            await call(i)
            latencies.append(time.perf_counter() - begun)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return calls / (time.perf_counter() - started), latencies


async def _reads(
    billing: _Billing, patients: list[uuid.UUID], metadata: dict[str, str]
) -> dict[str, tuple[float, float]]:
    """(calls/s, p99 ms) of GetBillingAccount (with `metadata`'s token) and of the
    Health/Check floor (open, no token)."""
    channels = [Channel("127.0.0.1", billing.grpc_port) for _ in range(CHANNELS)]
    try:
        stubs = [pb.BillingServiceStub(c, timeout=10, metadata=metadata) for c in channels]
        health = [HealthStub(c) for c in channels]
        requests = [pb.GetBillingAccountRequest(patient_id=str(p)) for p in patients]

        async def get(i: int) -> None:
            await stubs[i % CHANNELS].get_billing_account(requests[i % len(requests)])

        async def check(i: int) -> None:
            await health[i % CHANNELS].Check(HealthCheckRequest(), timeout=10)

        results = {}
        for name, call in (("health", check), ("get", get)):
            await _load(call, WARMUP_CALLS)
            rate, latencies = await _load(call, CALLS)
            results[name] = (rate, percentile(latencies, 0.99) * 1000)
        return results
    finally:
        for channel in channels:
            channel.close()


async def run(settings: Settings) -> list[str]:
    """Runs the billing benchmark; returns its results as markdown lines."""
    auth_url = os.environ.get("CARELOG_AUTH_URL", "http://127.0.0.1:4005")
    headers = await token_headers(auth_url)
    if not headers:
        raise RuntimeError(f"no auth service answers at {auth_url}: is `make up` running?")
    metadata = {name.lower(): value for name, value in headers.items()}
    billing = _Billing(settings, f"bench_billing_{uuid.uuid4().hex[:8]}", auth_url)
    try:
        await billing.start()
        lags, patients = await _lag(billing)
        reads = await _reads(billing, patients, metadata)
    finally:
        await billing.stop()
        await billing.clean_up()
    get_rate, get_p99 = reads["get"]
    lag_p50, lag_p99 = percentile(lags, 0.5) * 1000, percentile(lags, 0.99) * 1000
    floor_rate, floor_p99 = reads["health"]
    return [
        "## Billing (gRPC)",
        "",
        "Command: `uv run python -m bench.billing` (part of `make bench`). One billing",
        "process (grpclib server, consumer, outbox relay); the load comes from one Python",
        f"grpclib client process on the same machine ({os.cpu_count()} CPUs). Every",
        "GetBillingAccount carries a bearer token (checked, then cached until it expires).",
        "",
        "| measurement | result |",
        "| --- | --- |",
        f"| GetBillingAccount, {CONCURRENCY} in flight over {CHANNELS} connections"
        f" ({CALLS} calls) | {get_rate:,.0f} calls/s, p99 {get_p99:.1f} ms |",
        f"| floor: grpc.health.v1.Health/Check, same client and concurrency"
        f" | {floor_rate:,.0f} calls/s, p99 {floor_p99:.1f} ms |",
        f"| GetBillingAccount / floor | {get_rate / floor_rate:.2f} |",
        f"| PatientRegistered → account open, {PATIENTS} events at {EVENTS_PER_SECOND}/s"
        f" | p50 {lag_p50:.0f} ms, p99 {lag_p99:.0f} ms |",
        "",
    ]


if __name__ == "__main__":
    main_for(run)
