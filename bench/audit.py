"""What the disclosure audit costs a read: list p99 with it beside list p99 without it.

    uv run python -m bench.audit      (part of `make bench`; against the `make up` stack)

Two query API processes of one worker each, in the same run, on a scratch database of
their own (migrated, PATIENTS directory rows) and the stack's Redis and auth service:
the production app (`carelog serve read-api`), which records every page it answers in
the disclosure audit (spooled before the answer, shipped into `audit.disclosures`); and
the same app built here with its audit writer replaced by a no-op
(`create_app(audit_writer=...)`, which no production bootstrap passes: no setting turns
the audit off). wrk loads them in turn, ROUNDS alternating rounds each: first pages of
50 (answered from the Redis cache, where the audit weighs most), and pages read from
PostgreSQL (`minPosition=1` skips the cache). Afterwards every audited answer must have
its record in the table.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from litestar import Litestar

from bench.common import drop_database, main_for, ms, scratch_database, token_headers
from bench.loadgen import percentile
from bench.writes import (
    SERVE_READ_API,
    Round,
    _free_port,
    _median,
    _one_worker_query_api,
    _wrk_round,
)
from bench.wrk import get_script
from read_api.app import create_app
from runtime.audit import Disclosure
from runtime.audit_spool import Appender, Segment, store_name
from runtime.http import served
from runtime.settings import Settings

PATIENTS = 500
ROUNDS = 7
ROUND_SECONDS = 4.0
AIM = 1.2
SERVE_UNAUDITED = ("-m", "bench.audit", "serve", "unaudited")
PATHS = {
    "first page (cached)": "/patients?limit=50",
    "from PostgreSQL": "/patients?limit=50&minPosition=1",
}
PAUSE_MS = 10
"""Steady load: each of the 16 connections waits this long between an answer and its
next request (about 1,400 requests/s, half of what one worker answers flat out)."""
LOADS = {"flat out": 0, f"steady ({PAUSE_MS} ms pauses)": PAUSE_MS}
FLOOR_SAMPLES = 300


class NoAudit:
    """An audit writer that records nothing: the app without the audit, for comparison."""

    def __init__(self, pool: Any, settings: Settings):
        pass

    async def start(self) -> None:
        return None

    async def record(self, disclosure: Disclosure) -> None:
        return None

    async def flush(self) -> bool:
        return True

    async def close(self) -> None:
        return None


WRITERS: dict[str, Any] = {"unaudited": NoAudit}


def unaudited_worker() -> Litestar:
    """The query API with a no-op audit writer, as one worker process builds it."""
    from bootstrap.cli import worker_settings
    from runtime.security import with_verifier

    return served(
        with_verifier(
            functools.partial(create_app, audit_writer=NoAudit), worker_settings("read-api")
        )
    )


def _append_floor(directory: Path) -> tuple[float, float]:
    """p50 and p99 (ms) of one spool append (a page of 50 patients) after a PAUSE_MS
    rest, as the steady load's requests make them: what the audit adds to an answer
    before it goes out."""
    latencies = []
    page = tuple(uuid.uuid4() for _ in range(50))
    one = Disclosure("bench", "admin", "patient.list", page, "floor")
    appender = Appender(Segment.create(directory, store_name("postgresql:///bench_floor")))
    try:
        for i in range(FLOOR_SAMPLES + 20):
            time.sleep(PAUSE_MS / 1000)
            started = time.perf_counter()
            appender.append(one)
            if i >= 20:
                latencies.append(time.perf_counter() - started)
    finally:
        appender.segment.close()
    return percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000


def _scratch_database(settings: Settings) -> str:
    """A new database, migrated, holding PATIENTS directory rows; returns its URL."""
    url = scratch_database(settings, "bench_audit")
    with psycopg.connect(url) as conn:
        conn.execute(
            "INSERT INTO directory_patients (id, version, position, name, name_key, email,"
            " email_key, address, date_of_birth, registered_date)"
            " SELECT gen_random_uuid(), 1, g, 'Bench Audit ' || g, 'bench audit ' || g,"
            " 'a' || g || '@bench.carelog.invalid', 'a' || g || '@bench.carelog.invalid',"
            " g || ' Audit Road', date '1950-01-01' + g, date '2024-01-02'"
            " FROM generate_series(1, %s) AS g",
            [PATIENTS],
        )
        conn.execute(
            "INSERT INTO directory_positions (position, patient_id)"
            " SELECT position, id FROM directory_patients"
        )
    return url


async def run(settings: Settings) -> list[str]:
    auth_url = os.environ.get("CARELOG_AUTH_URL", f"http://127.0.0.1:{settings.ports['auth']}")
    admin = await token_headers(auth_url)
    url = await asyncio.to_thread(_scratch_database, settings)
    prefix = f"bench-audit-{uuid.uuid4().hex[:6]}."
    commands = {"with": SERVE_READ_API, "without": SERVE_UNAUDITED}
    spool = Path(tempfile.mkdtemp(prefix="carelog-bench-spool-"))
    ports = {which: _free_port() for which in commands}
    started = []
    rounds: dict[tuple[str, str, str], list[Round]] = {}
    try:
        for which, command in commands.items():
            started.append(
                _one_worker_query_api(
                    settings,
                    ports[which],
                    command,
                    CARELOG_DATABASE_URL=url,
                    CARELOG_TOPIC_PREFIX=prefix,
                    CARELOG_AUDIT_SPOOL_DIR=str(spool),
                )
            )
        for _ in range(ROUNDS):
            for label, path in PATHS.items():
                for load, pause in LOADS.items():
                    for which, port in ports.items():
                        rounds.setdefault((label, load, which), []).append(
                            await _wrk_round(
                                f"http://127.0.0.1:{port}",
                                get_script([admin], path, pause),
                                ROUND_SECONDS,
                            )
                        )
        floor_p50, floor_p99 = await asyncio.to_thread(_append_floor, spool)
    finally:
        for process in started:
            os.killpg(process.pid, 15)  # the audited one ships what it spooled, and stops
            process.wait(15)
        try:
            with psycopg.connect(url) as conn:
                row = conn.execute("SELECT count(*) FROM audit.disclosures").fetchone()
                recorded = row[0] if row else 0
        finally:
            await asyncio.to_thread(drop_database, settings, url)
            shutil.rmtree(spool, ignore_errors=True)
    answered = sum(
        r.result.statuses.get(200, 0)
        for (_, _, which), kept in rounds.items()
        if which == "with"
        for r in kept
    )

    lines = [
        "## Disclosure audit: list p99 with it and without it",
        "",
        f"`uv run python -m bench.audit` (part of `make bench`). Two query API processes of"
        f" one worker each, on a scratch database of {PATIENTS} patients: the production app,"
        " which appends a record of every page it answers to its audit spool before"
        " answering and ships the records into `audit.disclosures` (docs/auth.md); and the"
        " same app built by the benchmark with a no-op audit writer. wrk, 16 keep-alive"
        f" connections, medians of {ROUNDS} alternating rounds of {ROUND_SECONDS:.0f} s."
        " Flat out, each connection asks again as soon as it is answered: the worker is"
        " saturated, so latency is mostly queueing and the ratio shows what the audit costs"
        f" in throughput. Steady, each connection pauses {PAUSE_MS} ms between requests:"
        " latency is what one request takes.",
        "",
        "| list patients, 50 a page | load | with the audit | without | p99 ratio | p50 ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label in PATHS:
        for load in LOADS:
            audited, bare = (rounds[(label, load, w)] for w in ("with", "without"))
            p99 = _median(audited, lambda r: r.result.p99_ms)
            bare_p99 = _median(bare, lambda r: r.result.p99_ms)
            p50 = _median(audited, lambda r: r.result.p50_ms)
            bare_p50 = _median(bare, lambda r: r.result.p50_ms)
            failed = sum(r.result.failed + r.result.socket_errors for r in audited + bare)
            lines.append(
                f"| {label}{f', {failed} failed' if failed else ''} | {load} | "
                f"{_median(audited, lambda r: r.result.rate):.0f}/s, p50 {ms(p50)}, "
                f"p99 {ms(p99)} | "
                f"{_median(bare, lambda r: r.result.rate):.0f}/s, p50 {ms(bare_p50)}, "
                f"p99 {ms(bare_p99)} | {p99 / bare_p99:.2f}x | {p50 / bare_p50:.2f}x |"
            )
    lines += [
        "",
        f"Every audited answer stored: wrk counted {answered} answers with 200 from the"
        f" audited process, and the table holds {recorded} records after it stopped"
        f" ({_stored_verdict(answered, recorded, len(PATHS) * len(LOADS) * ROUNDS)}).",
        "",
        f"Floor, same run: one spool append (a page of 50 patients) after a {PAUSE_MS} ms"
        f" rest, as a steady request makes it: p50 {ms(floor_p50)}, p99 {ms(floor_p99)}."
        " That is what an audited answer waits for before it goes out; the INSERT into the"
        " table happens after, a batch every 10 ms.",
        "",
        f"Aim (issue): list p99 with the audit at most {AIM}x the p99 without it.",
        "",
    ]
    return lines


def _stored_verdict(answered: int, recorded: int, rounds: int) -> str:
    """Each round's end may leave up to 16 answers (one per connection) that wrk does
    not count but the audit recorded; fewer records than answers is a loss."""
    if recorded < answered:
        return f"{answered - recorded} MISSING"
    if recorded > answered + 16 * rounds:
        return f"{recorded - answered} more than answered"
    return f"every one, and {recorded - answered} answered after wrk stopped counting"


def main() -> None:
    if sys.argv[1:2] == ["serve"] and sys.argv[2:3] and sys.argv[2] in WRITERS:
        from runtime.http import serve

        port = int(os.environ["CARELOG_READ_API_PORT"])
        serve("bench.audit:unaudited_worker", "127.0.0.1", port, 1)
        return
    main_for(run)


if __name__ == "__main__":
    main()
