"""The query API while its dependencies blip: Redis killed and restarted, PostgreSQL
connections terminated under it.

Each test runs its own query API process against its own database and a Redis server
of its own (append-only, so a restart reloads what was cached, as a persistent Redis
would), so killing that Redis touches nothing shared.
"""

from __future__ import annotations

import asyncio
import random
import re
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
import redis
import redis.asyncio

from commands.service import PatientService
from commands.store import EventStore
from domain.roles import Role
from projections.directory import DirectoryProjection
from readmodels.directory import DirectoryCache
from runtime.cache import redis_for
from runtime.db import open_pool
from runtime.settings import Settings
from tests.support.patients import details, published
from tests.support.stack import Process, claim_key, eventually, free_port
from tests.support.tokens import TestTokens, served_jwks

pytestmark = [pytest.mark.integration, pytest.mark.fault]


@dataclass
class PrivateRedis:
    """A redis-server of this test's own; `kill()` is SIGKILL, `start()` reloads its data."""

    directory: Path
    port: int = field(default_factory=free_port)
    popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        log = (self.directory / "redis.log").open("ab")
        self.popen = subprocess.Popen(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--appendonly", "yes",
                "--appendfsync", "always",
                "--save", "",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        client = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.RedisError:
                pass
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"private redis did not start: {self.log_tail()}")
            time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def log_tail(self) -> str:
        return (self.directory / "redis.log").read_text()[-2000:]


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = PrivateRedis(directory).start()
    yield server
    server.kill()


@pytest.fixture
def jwks_url(tokens: TestTokens) -> Iterator[str]:
    with served_jwks(tokens) as url:
        yield url


@pytest.fixture
def api_settings(own_settings: Settings, private_redis: PrivateRedis) -> Settings:
    return own_settings.with_(redis_url=private_redis.url)


@pytest.fixture
def query_api(api_settings: Settings, jwks_url: str, tmp_path: Path) -> Iterator[Process]:
    api = Process(
        ["serve", "read-api"],
        api_settings,
        "read-api",
        tmp_path / "read-api",
        env={"CARELOG_JWKS_URL": jwks_url, "CARELOG_CACHE_BREAKER_RESET_SECONDS": "0.5"},
    ).start()
    yield api
    api.stop()


@pytest.fixture
async def client(
    query_api: Process, api_settings: Settings, tokens: TestTokens
) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{api_settings.ports['read-api']}",
        headers=tokens.headers(Role.ANALYST),
        timeout=30,
        limits=httpx.Limits(max_connections=16),
    ) as http:
        yield http


class Directory:
    """Writes through the test's event store and projects into its read model only
    (no cache write-through: the query API alone fills its private cache)."""

    def __init__(self, settings: Settings, store: EventStore):
        self.settings = settings
        self.service = PatientService(store, claim_key())
        self.store = store
        self.projection = DirectoryProjection()
        self.projected = 0

    async def catch_up(self) -> int:
        """Projects what is new; returns the newest position."""
        batch = published(self.store, self.projected + 1)
        pool = await open_pool(self.settings.database_url)
        try:
            if batch:
                async with pool.connection() as conn:
                    await self.projection.apply(conn, batch)
        finally:
            await pool.close()
        self.projected = self.store.recorder.max_notification_id() or 0
        return self.projected


@pytest.fixture
def directory(api_settings: Settings, own_store: EventStore) -> Directory:
    return Directory(api_settings, own_store)


@dataclass
class Load:
    """Reads from several tasks at once; every answer's status and latency is kept."""

    client: httpx.AsyncClient
    patients: list[UUID]
    tag: str
    statuses: list[int] = field(default_factory=list)
    latencies: dict[str, list[float]] = field(default_factory=dict)

    async def run(
        self, requests: int, phase: str, tasks: int = 8, midway: Any = None, at: int = 0
    ) -> None:
        """`requests` reads; `midway()` is called once when `at` of them have been sent,
        and the reads sent after it count as phase `<phase> after`."""
        sent = 0
        after = False
        rng = random.Random(phase)

        async def reader() -> None:
            nonlocal sent, after
            while sent < requests:
                sent += 1
                if midway is not None and sent == at:
                    midway()
                    after = True
                label = f"{phase} after" if after else phase
                if rng.random() < 0.2:
                    path, params = "/patients", {"name": self.tag, "limit": 20}
                else:
                    path, params = f"/patients/{rng.choice(self.patients)}", {}
                started = time.perf_counter()
                response = await self.client.get(path, params=params)
                self.latencies.setdefault(label, []).append(time.perf_counter() - started)
                self.statuses.append(response.status_code)

        await asyncio.gather(*(reader() for _ in range(tasks)))

    def p99_ms(self, label: str) -> float:
        ordered = sorted(self.latencies[label])
        return 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def ready(client: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    response = await client.get("/health/ready")
    return response.status_code, response.json()


async def skipped(client: httpx.AsyncClient) -> float:
    """How many cache calls the query API has skipped or seen fail, by its metrics."""
    text = (await client.get("/metrics")).text
    return sum(
        float(value)
        for value in re.findall(r"^carelog_read_cache_skipped_total\{[^}]*\} (\S+)$", text, re.M)
    )


async def test_reads_ride_out_a_redis_outage_and_never_serve_what_it_missed(
    client, directory, private_redis, api_settings
):
    tag = f"blip{random.randrange(10**8)}"
    patients = [
        directory.service.register(details(f"Blip {tag} {i:02d}"), date(2024, 3, 1)).patient_id
        for i in range(30)
    ]
    await directory.catch_up()
    changed = patients[0]
    first = await client.get(f"/patients/{changed}")
    assert first.status_code == 200
    assert first.json()["name"] == f"Blip {tag} 00"

    # What the query API cached, read straight from the private Redis.
    cache = DirectoryCache(redis_for(api_settings), api_settings.cache_prefix)

    async def cached_version() -> int | None:
        found = await cache.get_patient(str(changed))
        return None if found is None else found[0]

    assert await cached_version() == 1

    load = Load(client, patients, tag)
    await load.run(300, "with redis")
    await load.run(400, "outage", midway=private_redis.kill, at=100)
    assert load.statuses and all(status < 500 for status in load.statuses), sorted(
        set(load.statuses)
    )
    print(
        f"\np99 with redis: {load.p99_ms('with redis'):.1f} ms"
        f" ({len(load.latencies['with redis'])} reads); p99 without redis:"
        f" {load.p99_ms('outage after'):.1f} ms ({len(load.latencies['outage after'])} reads)"
    )

    status, body = await ready(client)
    assert status == 200
    assert body["status"] == "degraded"
    assert body["checks"]["database"] == "ok"
    assert body["checks"]["cache"].startswith("degraded")

    # The patient changes while the cache is unreachable: the database has it at once.
    directory.service.change(changed, details(f"Blip {tag} changed"))
    await directory.catch_up()
    during = await client.get(f"/patients/{changed}")
    assert during.status_code == 200
    assert during.json()["name"] == f"Blip {tag} changed"

    # Redis comes back with what it held before (append-only file): version 1 of him.
    private_redis.start()
    await cache.redis.aclose()
    cache = DirectoryCache(redis_for(api_settings), api_settings.cache_prefix)
    assert await cached_version() == 1

    after = await client.get(f"/patients/{changed}")
    assert after.status_code == 200
    assert after.json()["name"] == f"Blip {tag} changed"

    async def back_in_use() -> bool:
        status, body = await ready(client)
        assert status == 200, body
        return body["status"] == "ready"

    await eventually(back_in_use, timeout=30)
    for _ in range(2):  # a miss that refills the cache, then a hit
        again = await client.get(f"/patients/{changed}")
        assert again.status_code == 200
        assert again.json()["name"] == f"Blip {tag} changed"
    assert await cached_version() == 2

    # A restart between two reads: the pooled connections are dead, the next read
    # reconnects at once, and the cache is neither skipped nor seen to fail.
    before = await skipped(client)
    private_redis.kill()
    private_redis.start()
    for patient in patients[:5]:
        answer = await client.get(f"/patients/{patient}")
        assert answer.status_code == 200
    assert await skipped(client) == before
    assert (await ready(client))[1]["status"] == "ready"
    await cache.redis.aclose()


async def test_the_first_read_after_the_database_drops_its_connections_succeeds(
    client, directory, api_settings
):
    written = directory.service.register(details("Stale Pool"), date(2024, 3, 1))
    await directory.catch_up()
    position = written.position
    path = f"/patients/{written.patient_id}"
    # Reads that must reach PostgreSQL (minPosition skips the cache), many at once so
    # that the pool holds several connections.
    warm = await asyncio.gather(
        *(client.get(path, params={"minPosition": position}) for _ in range(40))
    )
    assert {r.status_code for r in warm} == {200}

    # What a PostgreSQL restart does to a pool: every server-side connection is gone.
    database = api_settings.database_url.rsplit("/", 1)[1]
    with psycopg.connect(api_settings.database_url, autocommit=True) as admin:
        pids = [
            pid
            for (pid,) in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                [database],
            ).fetchall()
        ]
        assert pids
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", [pid])

        async def gone() -> bool:
            left = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s)", [pids]
            ).fetchone()
            return left is not None and left[0] == 0

        await eventually(gone, timeout=30)

    started = time.perf_counter()
    first = await client.get(path, params={"minPosition": position})
    print(
        f"\nfirst read after the connections died: {1000 * (time.perf_counter() - started):.0f} ms"
    )
    assert first.status_code == 200, first.text
    assert first.json()["name"] == "Stale Pool"
    rest = await asyncio.gather(
        *(client.get(path, params={"minPosition": position}) for _ in range(20)),
        client.get("/patients", params={"name": "Stale Pool", "minPosition": position}),
    )
    assert {r.status_code for r in rest} == {200}, [r.text for r in rest if r.status_code != 200]
