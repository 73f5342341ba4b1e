"""Benchmark of the analytics projection and the notifier, on the running stack.

    uv run python -m bench.notifications      (part of `make bench`; needs `make up`)

- Projection throughput: the same batches of patient registrations (500 a batch)
  applied by the analytics projection and by the directory projection, each into
  scratch copies of its tables, in this process: events per second.
- Event → email: registrations through the command API one at a time; for each, the
  time from the 201 until its welcome email is accepted by the SMTP server (the
  ledger says `sent`), beside the time until its directory row exists.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import UTC, date, datetime
from typing import Any

import psycopg
from psycopg import sql

from bench.common import main_for, ms, token_headers
from bench.loadgen import Connection, percentile
from domain import contracts
from notifications.intake import WELCOME, notification_id
from projections.analytics import AnalyticsProjection
from projections.directory import DirectoryProjection
from readmodels import analytics as analytics_model
from readmodels.directory import Tables, create_copy
from runtime.settings import Settings

EVENTS = 5_000
BATCH = 500
SAMPLES = 100
DRAIN_SECONDS = 900


def _registrations(count: int) -> list[tuple[Any, Any]]:
    out = []
    for i in range(count):
        data = contracts.PatientRegisteredV2(
            name=f"Bench Person {i}",
            given_name="Bench Person",
            family_name=str(i),
            email=f"bench-{i}@bench.carelog.invalid",
            address="1 Bench Road",
            date_of_birth=date(1950 + i % 60, 1 + i % 12, 1 + i % 28),
            registered_date=date(2024, 1, 1 + i % 28),
        )
        envelope = contracts.envelope(
            data,
            aggregate_id=uuid.uuid4(),
            aggregate_version=1,
            position=10**12 + i,
            occurred_at=datetime.now(UTC),
        )
        out.append((envelope, data))
    return out


async def _throughput(settings: Settings) -> tuple[float, float]:
    events = _registrations(EVENTS)
    token = uuid.uuid4().hex[:8]
    directory = Tables(
        patients=f"bench_dir_{token}",
        tracking="projection_tracking",
        positions=f"bench_dpos_{token}",
        history=f"bench_dhist_{token}",
    )
    analytics = analytics_model.Tables(
        patients=f"bench_ap_{token}",
        appointments=f"bench_aa_{token}",
        money=f"bench_am_{token}",
        positions=f"bench_apos_{token}",
    )
    live = analytics_model.LIVE
    pairs = [
        (analytics.patients, live.patients),
        (analytics.appointments, live.appointments),
        (analytics.money, live.money),
        (analytics.positions, live.positions),
    ]
    rates = []
    async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
        await create_copy(conn, directory)
        for copy, original in pairs:
            await conn.execute(
                sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
                    sql.Identifier(copy), sql.Identifier(original)
                )
            )
        await conn.commit()
        try:
            for projection in (
                AnalyticsProjection(analytics, name=f"bench-analytics-{token}"),
                DirectoryProjection(directory, name=f"bench-directory-{token}"),
            ):
                started = time.perf_counter()
                for i in range(0, EVENTS, BATCH):
                    await projection.apply(conn, events[i : i + BATCH])
                rates.append(EVENTS / (time.perf_counter() - started))
        finally:
            for table in [
                directory.patients,
                directory.positions,
                directory.history,
                *(c for c, _ in pairs),
            ]:
                await conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))
            await conn.execute(
                "DELETE FROM projection_tracking WHERE projection LIKE %s", [f"bench-%-{token}"]
            )
            await conn.commit()
    return rates[0], rates[1]


async def _lags(settings: Settings) -> tuple[list[float], list[float]]:
    commands = os.environ.get(
        "CARELOG_COMMANDS_URL", f"http://127.0.0.1:{settings.ports['commands']}"
    )
    headers = await token_headers(os.environ.get("CARELOG_AUTH_URL", "http://127.0.0.1:4005"))
    conn = Connection(commands)
    to_row: list[float] = []
    to_mail: list[float] = []
    run = uuid.uuid4().hex[:6]
    async with await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as db:
        # Steady state: let the notifier work off what earlier benchmarks queued (in a
        # full `make bench`, tens of thousands of welcome emails from the write rounds).
        deadline = time.monotonic() + DRAIN_SECONDS
        while time.monotonic() < deadline:
            row = await (
                await db.execute(
                    "SELECT count(*) FROM notifications WHERE status = 'sending'"
                    " OR (status IN ('pending', 'failed-retrying') AND next_attempt_at <= now())"
                )
            ).fetchone()
            if row and row[0] == 0:
                break
            await asyncio.sleep(0.5)
        for i in range(SAMPLES):
            reply = await conn.request(
                "POST",
                "/patients",
                headers,
                {
                    "name": f"Bench Mail {i}",
                    "email": f"bench-mail-{run}-{i}@bench.carelog.invalid",
                    "address": "1 Bench Road",
                    "dateOfBirth": "1980-01-01",
                    "registeredDate": "2024-01-02",
                },
            )
            done = time.perf_counter()
            patient = uuid.UUID(reply.json()["id"])
            welcome = notification_id(f"event:{contracts.event_id(patient, 1)}", WELCOME, patient)
            row_at = mail_at = None
            while row_at is None or mail_at is None:
                if (
                    row_at is None
                    and await (
                        await db.execute(
                            "SELECT 1 FROM directory_patients WHERE id = %s", [patient]
                        )
                    ).fetchone()
                ):
                    row_at = time.perf_counter() - done
                if (
                    mail_at is None
                    and await (
                        await db.execute(
                            "SELECT 1 FROM notifications WHERE id = %s AND status = 'sent'",
                            [welcome],
                        )
                    ).fetchone()
                ):
                    mail_at = time.perf_counter() - done
                if time.perf_counter() - done > 30:
                    raise TimeoutError("no welcome email within 30 s: is the notifier running?")
                await asyncio.sleep(0.001)
            to_row.append(row_at)
            to_mail.append(mail_at)
            await asyncio.sleep(0.02)
    await conn.close()
    return to_row, to_mail


async def run(settings: Settings) -> list[str]:
    analytics_rate, directory_rate = await _throughput(settings)
    to_row, to_mail = await _lags(settings)
    row99, mail99 = percentile(to_row, 0.99) * 1000, percentile(to_mail, 0.99) * 1000
    return [
        "## Analytics and notifications",
        "",
        "`uv run python -m bench.notifications` (part of `make bench`). Same run for every floor.",
        "",
        "| figure | value | beside, same run | ratio |",
        "| --- | --- | --- | --- |",
        f"| analytics projection, {EVENTS} registrations in batches of {BATCH} |"
        f" {analytics_rate:,.0f} events/s | the directory projection, same batches:"
        f" {directory_rate:,.0f} events/s | {analytics_rate / directory_rate:.2f}x |",
        f"| event → welcome email accepted by SMTP (201 until the ledger says sent),"
        f" {SAMPLES} samples | p50 {ms(percentile(to_mail, 0.5) * 1000)}, p99 {ms(mail99)} |"
        f" event → directory row: p50 {ms(percentile(to_row, 0.5) * 1000)}, p99 {ms(row99)} |"
        f" p99 {mail99 / row99:.2f}x |",
        "",
    ]


if __name__ == "__main__":
    main_for(run)
