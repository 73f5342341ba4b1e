"""What the disclosure audit costs a read: list p99 with it beside list p99 without it.

    uv run python -m bench.audit      (part of `make bench`; against the `make up` stack)

Three query API processes of one worker each, in the same run, on a scratch database of
their own (migrated, PATIENTS directory rows) and the stack's Redis and auth service:
the production app (`carelog serve read-api`), which records every page it answers in
`audit.disclosures`; the same app built here with its audit writer replaced by a no-op
(`create_app(audit_writer=...)`, which no production bootstrap passes: no setting turns
the audit off); and the production writer with asynchronous commits, which carelog does
not use, to show what waiting for the disk costs. wrk loads them in turn, ROUNDS
alternating rounds each: first
pages of 50 (answered from the Redis cache, where the audit's INSERT weighs most), and
pages read from PostgreSQL (`minPosition=1` skips the cache).
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import time
import uuid
import weakref
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
from runtime.audit import Disclosure, GroupedWriter, _Known, _statement
from runtime.http import served
from runtime.settings import Settings

PATIENTS = 500
ROUNDS = 5
ROUND_SECONDS = 4.0
AIM = 1.2
SERVE_UNAUDITED = ("-m", "bench.audit", "serve", "unaudited")
SERVE_ASYNCHRONOUS = ("-m", "bench.audit", "serve", "asynchronous-commit")
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

    def __init__(self, pool: Any):
        pass

    async def record(self, disclosure: Disclosure) -> None:
        return None

    async def close(self) -> None:
        return None


class AsynchronousCommit(GroupedWriter):
    """The production writer on connections that do not wait for the disk at commit
    (`synchronous_commit = off`): a record is committed and visible before the answer,
    but reaches the disk up to three WAL-writer rounds later. Measured beside the
    production writer, to show what the durable commit costs; carelog does not use it."""

    def __init__(self, pool: Any):
        super().__init__(pool)
        self._set: weakref.WeakSet[Any] = weakref.WeakSet()

    async def _line(self) -> Any:
        line = await super()._line()
        if line not in self._set:
            await line.cursor.execute("SET synchronous_commit = off")
            self._set.add(line)
        return line


WRITERS: dict[str, Any] = {"unaudited": NoAudit, "asynchronous-commit": AsynchronousCommit}


def unaudited_worker() -> Litestar:
    return worker("unaudited")


def asynchronous_commit_worker() -> Litestar:
    return worker("asynchronous-commit")


def worker(writer: str) -> Litestar:
    """The query API with one of WRITERS, as one worker process builds it."""
    from bootstrap.cli import worker_settings
    from runtime.security import with_verifier

    return served(
        with_verifier(
            functools.partial(create_app, audit_writer=WRITERS[writer]),
            worker_settings("read-api"),
        )
    )


def _round_trip_floor(url: str) -> tuple[float, float]:
    """p50 and p99 (ms) of one disclosure INSERT, committed durably, on a connection that
    rests PAUSE_MS between statements as the steady load's connections do: the least an
    audited answer can add to an unaudited one on this machine."""
    latencies = []
    one = Disclosure("bench", "admin", "patient.list", (uuid.uuid4(),), "floor")
    with psycopg.connect(url, autocommit=True) as conn:
        known = _Known()
        for i in range(FLOOR_SAMPLES + 20):
            time.sleep(PAUSE_MS / 1000)
            statement, params, lists = _statement([one], known)
            started = time.perf_counter()
            conn.execute(statement, params)
            if i >= 20:  # the first ones prepare the statement
                latencies.append(time.perf_counter() - started)
            known.stored(lists)
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
    commands = {"with": SERVE_READ_API, "without": SERVE_UNAUDITED, "async": SERVE_ASYNCHRONOUS}
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
        floor_p50, floor_p99 = await asyncio.to_thread(_round_trip_floor, url)
        with psycopg.connect(url) as conn:
            (recorded,) = conn.execute("SELECT count(*) FROM audit.disclosures").fetchone() or (0,)
    finally:
        for process in started:
            os.killpg(process.pid, 15)
            process.wait(15)
        await asyncio.to_thread(drop_database, settings, url)

    lines = [
        "## Disclosure audit: list p99 with it and without it",
        "",
        f"`uv run python -m bench.audit` (part of `make bench`). Three query API processes of"
        f" one worker each, on a scratch database of {PATIENTS} patients: the production app,"
        " which records every page it answers in the disclosure audit, committed durably,"
        " before answering; the same app built by the benchmark with a no-op audit writer;"
        " and, to show what the durable commit costs, the production writer on connections"
        " with `synchronous_commit = off` (the record is committed before the answer but"
        " reaches the disk a little later; carelog does not run this way). wrk, 16 keep-alive"
        f" connections, medians of {ROUNDS} alternating rounds of {ROUND_SECONDS:.0f} s;"
        f" {recorded} disclosures recorded. Flat out, each connection asks again as soon as"
        " it is answered: the worker is saturated, so latency is mostly queueing and the"
        " ratio shows what the audit costs in throughput. Steady, each connection pauses"
        f" {PAUSE_MS} ms between requests: latency is what one request takes.",
        "",
        "| list patients, 50 a page | load | with the audit | without | p99 ratio | p50 ratio"
        " | asynchronous commit: p99, ratio |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label in PATHS:
        for load in LOADS:
            audited, bare, quick = (rounds[(label, load, w)] for w in ("with", "without", "async"))
            p99 = _median(audited, lambda r: r.result.p99_ms)
            bare_p99 = _median(bare, lambda r: r.result.p99_ms)
            quick_p99 = _median(quick, lambda r: r.result.p99_ms)
            p50 = _median(audited, lambda r: r.result.p50_ms)
            bare_p50 = _median(bare, lambda r: r.result.p50_ms)
            failed = sum(r.result.failed + r.result.socket_errors for r in audited + bare + quick)
            lines.append(
                f"| {label}{f', {failed} failed' if failed else ''} | {load} | "
                f"{_median(audited, lambda r: r.result.rate):.0f}/s, p50 {ms(p50)}, "
                f"p99 {ms(p99)} | "
                f"{_median(bare, lambda r: r.result.rate):.0f}/s, p50 {ms(bare_p50)}, "
                f"p99 {ms(bare_p99)} | {p99 / bare_p99:.2f}x | {p50 / bare_p50:.2f}x | "
                f"{_median(quick, lambda r: r.result.rate):.0f}/s, p99 {ms(quick_p99)},"
                f" {quick_p99 / bare_p99:.2f}x |"
            )
    lines += [
        "",
        f"Floor, same run: one disclosure INSERT, committed durably, from a connection that"
        f" rests {PAUSE_MS} ms between statements: p50 {ms(floor_p50)}, p99 {ms(floor_p99)}."
        " An audited answer waits for at least that, on top of the unaudited answer's time:"
        " at the steady load it is a large share of a 1-2 ms answer; flat out, where requests"
        " queue, it is a smaller one.",
        "",
        f"Aim (issue): list p99 with the audit at most {AIM}x the p99 without it.",
        "",
    ]
    return lines


def main() -> None:
    if sys.argv[1:2] == ["serve"] and sys.argv[2:3] and sys.argv[2] in WRITERS:
        from runtime.http import serve

        port = int(os.environ["CARELOG_READ_API_PORT"])
        serve(f"bench.audit:{sys.argv[2].replace('-', '_')}_worker", "127.0.0.1", port, 1)
        return
    main_for(run)


if __name__ == "__main__":
    main()
