"""`make bench`: the patients slice's speed, each figure beside its floor from the same run.

    uv run python -m bench        (against the running `make up` stack)

Figures, on loopback, at a stated concurrency:
- register-patient commands/s (POST /patients on :4000) beside single-row INSERTs/s
  into PostgreSQL with the same durability (one committed transaction each);
- list-patients p50/p99 on the query API (:4003), first pages (cached) and cursor
  pages (not cached), beside a bare endpoint on the same ASGI server;
- event-to-read-model lag: from a 201 until the directory row exists, p50/p99;
- the relay's publish rate when it has a backlog, beside a raw Kafka produce rate
  with the same producer settings (idempotent, acks=all).
Then the other benchmarks (writes, the disclosure audit's cost, appointments, the
gateway, billing...), and everything goes to
docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import os
import platform
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import structlog

from bench.common import CONCURRENCY, Load, closed_loop, insert_floor, ms, quiesce, token_headers
from bench.cpu import wait_until_quiet
from bench.loadgen import Connection, percentile
from runtime.kafka import delete_topics, ensure_topics, reliable_producer
from runtime.settings import Settings

REGISTRATIONS = 1500
READS = 3000
LAG_SAMPLES = 200
KAFKA_MESSAGES = 20_000
OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
COMMAND = "make bench"
log = structlog.get_logger(__name__)
FAILED: list[str] = []
"""The benchmarks of this run that raised: their sections say so, and `make bench` fails."""


def patient_body(i: int, run: str) -> dict[str, Any]:
    return {
        "name": f"Bench Patient {run} {i:05d}",
        "email": f"bench-{run}-{i}@bench.carelog.invalid",
        "address": f"{i} Benchmark Road",
        "dateOfBirth": f"19{50 + i % 50}-0{1 + i % 9}-1{i % 9}",
        "registeredDate": "2024-01-02",
    }


async def event_lag(settings: Settings, commands: str, headers: dict[str, str]) -> list[float]:
    """Seconds from each 201 until the directory row exists (sampled one at a time)."""
    conn = Connection(commands)
    lags = []
    run = uuid.uuid4().hex[:6]
    async with await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as db:
        for i in range(LAG_SAMPLES):
            reply = await conn.request("POST", "/patients", headers, patient_body(i, f"lag{run}"))
            done = time.perf_counter()
            patient_id = reply.json()["id"]
            while True:
                row = await (
                    await db.execute("SELECT 1 FROM directory_patients WHERE id = %s", [patient_id])
                ).fetchone()
                if row is not None:
                    break
                await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - done)
            await asyncio.sleep(0.02)
    await conn.close()
    return lags


async def kafka_floor(settings: Settings) -> float:
    """Messages/s from one producer with the relay's settings, envelope-sized."""
    topic = settings.topic(f"bench.floor.{uuid.uuid4().hex[:6]}")
    await ensure_topics(settings, [topic])
    producer = reliable_producer(settings)
    await producer.start()
    value = os.urandom(420)
    try:
        start = time.perf_counter()
        pending = []
        for i in range(KAFKA_MESSAGES):
            pending.append(await producer.send(topic, value=value, key=str(i % 997).encode()))
            if len(pending) >= 500:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        return KAFKA_MESSAGES / (time.perf_counter() - start)
    finally:
        await producer.stop()
        await delete_topics(settings, topic)


async def relay_rate(settings: Settings) -> tuple[float, int]:
    """Events/s a relay publishes working off the whole log (its own name and topics)."""
    from commands.relay import EventStoreLog
    from commands.store import EventStore
    from runtime.publisher import Publisher

    store = await asyncio.to_thread(EventStore, settings.database_url, 2)
    run = uuid.uuid4().hex[:6]
    producer = reliable_producer(settings)
    await producer.start()
    source = EventStoreLog(
        store,
        settings.database_url,
        topic_prefix=settings.topic(f"bench.{run}."),
        name=f"bench-{run}",
    )
    relay = Publisher(source, producer)
    try:
        await ensure_topics(settings, source.topics)
        last = await asyncio.to_thread(store.recorder.max_notification_id) or 0
        published = 0
        await source.open()
        start = time.perf_counter()
        while source.position < last:
            published += await relay.cycle()
        seconds = time.perf_counter() - start
        async with await psycopg.AsyncConnection.connect(
            settings.database_url, autocommit=True
        ) as db:
            await db.execute("DELETE FROM relay_positions WHERE relay = %s", [source.name])
    finally:
        await source.close()
        await producer.stop()
        store.close()
        await delete_topics(settings, source.topic_prefix)
    return published / seconds, published


async def patients(settings: Settings) -> list[str]:
    commands = os.environ.get(
        "CARELOG_COMMANDS_URL", f"http://127.0.0.1:{settings.ports['commands']}"
    )
    reads = os.environ.get("CARELOG_READ_API_URL", f"http://127.0.0.1:{settings.ports['read-api']}")
    headers = await token_headers(os.environ.get("CARELOG_AUTH_URL", "http://127.0.0.1:4005"))
    run = uuid.uuid4().hex[:6]

    floor = await insert_floor(settings)
    register = await closed_loop(
        commands,
        lambda conn, i: conn.request("POST", "/patients", headers, patient_body(i, run)),
        REGISTRATIONS,
    )
    lags = await event_lag(settings, commands, headers)
    settled = await quiesce(settings)
    bare = await closed_loop(reads, lambda conn, _: conn.request("GET", "/health/live"), READS)
    first_pages = await closed_loop(
        reads, lambda conn, _: conn.request("GET", "/patients?limit=50", headers), READS
    )
    cursors = await _cursor_paths(reads, headers)
    paged = await closed_loop(
        reads, lambda conn, i: conn.request("GET", cursors[i % len(cursors)], headers), READS
    )
    kafka = await kafka_floor(settings)
    relay, relayed = await relay_rate(settings)

    reg_ratio = register.rate / floor.rate
    lines = [
        "## Patients: commands, reads, lag",
        "",
        f"Concurrency {CONCURRENCY} keep-alive connections, closed loop, on loopback. Reads"
        f" start once the projection has applied every write above ({settled:.1f} s after)."
        " The relay, the directory projection and billing's consumer run throughout, on the"
        " same cores, handling every event the registrations make.",
        "",
        "| figure | value | floor, same run | ratio |",
        "| --- | --- | --- | --- |",
        f"| register patient (POST /patients), {REGISTRATIONS} requests | "
        f"{register.rate:.0f}/s, p50 {ms(register.p(0.5))}, p99 {ms(register.p(0.99))}"
        f"{_failed(register)} | single-row INSERT, own transaction: {floor.rate:.0f}/s, "
        f"p99 {ms(floor.p(0.99))} | {reg_ratio:.0%} of the insert rate |",
        f"| list patients, first page (cached), {READS} requests | "
        f"{first_pages.rate:.0f}/s, p50 {ms(first_pages.p(0.5))}, p99 {ms(first_pages.p(0.99))}"
        f"{_failed(first_pages)} | bare endpoint (GET /health/live, same server): "
        f"{bare.rate:.0f}/s, p50 {ms(bare.p(0.5))}, p99 {ms(bare.p(0.99))} | "
        f"p99 {first_pages.p(0.99) / bare.p(0.99):.2f}x the bare p99 |",
        f"| list patients, cursor pages (mostly uncached), {READS} requests | "
        f"{paged.rate:.0f}/s, p50 {ms(paged.p(0.5))}, p99 {ms(paged.p(0.99))}{_failed(paged)} | "
        f"(same bare endpoint) | p99 {paged.p(0.99) / bare.p(0.99):.2f}x the bare p99 |",
        f"| event → read model lag (201 until the directory row exists), {LAG_SAMPLES} samples"
        f" | p50 {ms(percentile(lags, 0.5) * 1000)}, p99 {ms(percentile(lags, 0.99) * 1000)} | "
        "— | — |",
        f"| relay working off the whole log ({relayed} notifications) | {relay:.0f} events/s | "
        f"raw Kafka produce (idempotent, acks=all): {kafka:.0f} msgs/s | {relay / kafka:.0%} |",
        "",
        "Aims (issue): register at least 25% of the insert floor; list p99 at most 3x the bare"
        " endpoint's p99.",
        "",
    ]
    return lines


async def _cursor_paths(reads: str, headers: dict[str, str]) -> list[str]:
    """Paths of successive cursor pages through the directory, name order, 20 a page."""
    conn = Connection(reads)
    paths = []
    path = "/patients?limit=20"
    for _ in range(150):
        paths.append(path)
        page = (await conn.request("GET", path, headers)).json()
        if not page.get("next"):
            break
        path = f"/patients?limit=20&cursor={page['next']}"
    await conn.close()
    return paths


def _failed(load: Load) -> str:
    return f" ({load.failures} failed)" if load.failures else ""


async def run_all() -> str:
    settings = Settings.from_env({"CARELOG_ENV": "development", **os.environ})
    sections = [await patients(settings)]
    for name in (
        "bench.writes",
        "bench.audit",
        "bench.sealing",
        "bench.appointments",
        "bench.notifications",
        "bench.rebuild",
        "bench.gateway",
        "bench.billing",
    ):
        try:
            module = __import__(name, fromlist=["run"])
        except ImportError:
            continue
        waited, used = await asyncio.to_thread(wait_until_quiet)
        log.info("stack quiet", benchmark=name, waited=round(waited, 1), cores=round(used, 2))
        try:
            sections.append(await module.run(settings))
        except Exception as exc:  # the other sections' figures are kept; main() exits 1
            log.exception("benchmark failed", benchmark=name)
            FAILED.append(name)
            sections.append([f"## {name}", "", f"Failed in this run: {type(exc).__name__}."])
    head = [
        "# Benchmarks",
        "",
        f"Made by `{COMMAND}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, on one machine with"
        f" {os.cpu_count()} cores ({platform.machine()}, Python {platform.python_version()}):"
        " the load generator, the services, PostgreSQL, Kafka and Redis share those cores."
        " Every figure sits beside a floor measured in the same run. Each benchmark after"
        " the first starts once the stack has settled (under a quarter of a core for a"
        " second, as idle), so none measures the backlog of the one before.",
        "",
    ]
    body = "\n\n".join("\n".join(section).strip() for section in sections)
    return "\n".join(head) + "\n" + body + "\n"


def main() -> None:
    text = asyncio.run(run_all())
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(text)
    print(f"wrote {OUT}")
    if FAILED:
        raise SystemExit(f"benchmarks that failed: {', '.join(FAILED)}")


if __name__ == "__main__":
    main()
