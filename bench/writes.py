"""Write speed beside its floors, CPU per operation, update cost by history, reads per core.

    uv run python -m bench.writes      (part of `make bench`; against the `make up` stack)

Load comes from wrk (16 keep-alive connections, 2 threads) so that the load tool takes
little of the two cores the stack shares. Every figure is the median of ROUNDS
alternating rounds (direct, then through the gateway), ROUND_SECONDS each, each on a
settled stack, after register rounds that are not counted (until the broker's JIT
compiler has settled, see WARMUP_ROUNDS):
- register (POST /patients) and update (PUT /patients/{id}) per second, p50 and p99;
- milliseconds of CPU per operation, summed over every process of the stack (the
  carelog processes, PostgreSQL, Kafka, Redis, the gateway) from /proc, from each
  round's start until the stack has settled after it (the consumers' backlog worked
  off); and how much of it each process used;
- during each direct register round, a probe registers one more patient every 50 ms
  and times it until the directory row and the billing account exist (lag);
- the floor: single-row INSERTs into PostgreSQL, each its own transaction.
Then: sequential PUTs on one patient, p50 at versions 2-51 beside p50 at versions
951-1000 (a patient's history must not make it slower); and list throughput from the
query API's worker processes beside one process started for the comparison.
Through the gateway, requests go as 16 receptionists in turn, as a practice's staff would.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg

from bench.common import CONCURRENCY, insert_floor, main_for, ms, quiesce, token_headers
from bench.cpu import CpuMeter, compiler_seconds, wait_until_quiet
from bench.gateway import bench_users
from bench.loadgen import Connection, percentile
from bench.wrk import WrkResult, get_script, register_script, run_wrk, update_script
from runtime.settings import Settings

PROFILE = Path(__file__).with_name("profile.md")
"""Where the CPU went, before and after (written by hand from profiles; see its text)."""


ROUNDS = 3
ROUND_SECONDS = 10.0
WARMUP_SECONDS = 5.0
WARMUP_ROUNDS = 12
COMPILER_SETTLED = 0.01
"""Register rounds of WARMUP_SECONDS before the measured ones, not counted, until the
broker's JIT compiler threads used under COMPILER_SETTLED cores over one (at most
WARMUP_ROUNDS). The broker's JVM compiles its hot paths during its first minutes under
load: on a fresh stack its compiler threads took 0.13 of a core in a register round at
700/s, almost half of the broker's CPU, and still 0.06 three rounds later. The figures
are a running system's, not a starting one's."""
UPDATE_PATIENTS = 1000
HISTORY = 1000
PROBE_EVERY = 0.05
SERVE_READ_API = ("-m", "bootstrap", "serve", "read-api")


class Round:
    """A round's answers, and the stack's CPU from its start until the stack had worked
    off what the round left it (the consumers' backlog), `drained` seconds after wrk
    stopped."""

    def __init__(self, result: WrkResult, cpu: CpuMeter, drained: float, lags: list[float]):
        self.result = result
        self.cpu = cpu
        self.drained = drained
        self.lags = lags

    @property
    def operations(self) -> int:
        """wrk's answers and the probe's registrations (each probe registers one)."""
        return self.result.ok + len(self.lags)

    @property
    def cpu_ms(self) -> float:
        """The stack's CPU per operation."""
        return self.cpu.per_operation(self.operations)


def _median(rounds: list[Round], value: Callable[[Round], float]) -> float:
    return statistics.median(value(r) for r in rounds)


def _row(label: str, rounds: list[Round]) -> str:
    failed = sum(r.result.failed + r.result.socket_errors for r in rounds)
    return (
        f"| {label} | {_median(rounds, lambda r: r.result.rate):.0f}/s, "
        f"p50 {ms(_median(rounds, lambda r: r.result.p50_ms))}, "
        f"p99 {ms(_median(rounds, lambda r: r.result.p99_ms))}"
        f"{f', {failed} failed' if failed else ''} | "
        f"{_median(rounds, lambda r: r.cpu_ms):.2f} ms |"
    )


def _per_process(rounds: list[Round]) -> str:
    middle = sorted(rounds, key=lambda r: r.result.rate)[len(rounds) // 2]
    return middle.cpu.per_group(middle.operations)


async def _probe(
    settings: Settings, base: str, headers: dict[str, str], stop: asyncio.Event
) -> list[float]:
    """Seconds from a 201 until both the directory row and the billing account exist."""
    conn = Connection(base)
    lags: list[float] = []
    run = uuid.uuid4().hex[:6]
    i = 0
    async with await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as db:
        while not stop.is_set():
            i += 1
            body = {
                "name": "Bench Probe",
                "email": f"probe-{run}-{i}@bench.carelog.invalid",
                "address": "1 Probe Road",
                "dateOfBirth": "1970-01-01",
                "registeredDate": "2024-01-02",
            }
            reply = await conn.request("POST", "/patients", headers, body)
            if reply.status != 201:
                await asyncio.sleep(PROBE_EVERY)
                continue
            done = time.perf_counter()
            patient_id = reply.json()["id"]
            while True:
                row = await (
                    await db.execute(
                        "SELECT (SELECT count(*) FROM directory_patients WHERE id = %s)"
                        " + (SELECT count(*) FROM billing.accounts WHERE patient_id = %s)",
                        [patient_id, patient_id],
                    )
                ).fetchone()
                if row is not None and row[0] == 2:
                    break
                await asyncio.sleep(0.002)
            lags.append(time.perf_counter() - done)
            await asyncio.sleep(PROBE_EVERY)
    await conn.close()
    return lags


Probe = Callable[[asyncio.Event], Coroutine[Any, Any, list[float]]]


async def _wrk_round(url: str, script: str, seconds: float, probe: Probe | None = None) -> Round:
    """A round on a settled stack, its CPU counted until the stack has settled again: what
    the round's writes cost the consumers after wrk stopped is theirs too. `probe` runs
    while wrk does (its CPU counted with the round's)."""
    await asyncio.to_thread(wait_until_quiet)
    stop = asyncio.Event()
    with CpuMeter() as cpu:
        probing: asyncio.Task[list[float]] | None = None
        if probe is not None:
            probing = asyncio.create_task(probe(stop))
        result = await asyncio.to_thread(run_wrk, url, script, seconds)
        stop.set()
        lags = await probing if probing is not None else []
        drained, _ = await asyncio.to_thread(wait_until_quiet)
    return Round(result, cpu, drained, lags)


async def _warm_up(url: str, script: str) -> tuple[int, float]:
    """Register rounds until the broker's compiler threads have settled (see WARMUP_ROUNDS):
    returns the rounds run and the compiler's cores in the last one."""
    compiling = 0.0
    for done in range(1, WARMUP_ROUNDS + 1):
        before, started = compiler_seconds(), time.perf_counter()
        await asyncio.to_thread(run_wrk, url, script, WARMUP_SECONDS)
        compiling = (compiler_seconds() - before) / (time.perf_counter() - started)
        if compiling < COMPILER_SETTLED:
            return done, compiling
    return WARMUP_ROUNDS, compiling


async def _patients(base: str, headers: dict[str, str], count: int) -> list[str]:
    """Registers `count` patients (16 at a time) and returns their ids."""
    ids: list[str] = []
    run = uuid.uuid4().hex[:6]
    counter = iter(range(count))

    async def worker() -> None:
        conn = Connection(base)
        for i in counter:
            body = {
                "name": f"Bench Updated {i}",
                "email": f"upd-{run}-{i}@bench.carelog.invalid",
                "address": f"{i} Update Road",
                "dateOfBirth": "1970-01-01",
                "registeredDate": "2024-01-02",
            }
            reply = await conn.request("POST", "/patients", headers, body)
            if reply.status == 201:
                ids.append(reply.json()["id"])
        await conn.close()

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return ids


async def _history(settings: Settings, base: str, headers: dict[str, str]) -> tuple[float, float]:
    """p50 of PUTs on a patient at versions 2-51, and on one at versions 1001-1050 (ms).

    The long history is written first, untimed; once every event is applied downstream,
    the two patients are changed in turn, so that whatever else the machine does weighs
    on both alike.
    """
    conn = Connection(base)
    run = uuid.uuid4().hex[:6]

    async def new_patient(name: str) -> tuple[str, dict[str, Any]]:
        body = {
            "name": f"Bench {name}",
            "email": f"hist-{name}-{run}@bench.carelog.invalid",
            "address": "1 History Road",
            "dateOfBirth": "1970-01-01",
            "registeredDate": "2024-01-02",
        }
        reply = await conn.request("POST", "/patients", headers, body)
        body.pop("registeredDate")
        return reply.json()["id"], body

    async def change(patient: str, body: dict[str, Any], version: int) -> float:
        reply = await conn.request(
            "PUT", f"/patients/{patient}", headers, dict(body, address=f"{version} History Road")
        )
        if reply.status != 200:
            raise RuntimeError(f"PUT at version {version} answered {reply.status}")
        return reply.seconds

    old, old_body = await new_patient("Long")
    for version in range(2, HISTORY + 1):
        await change(old, old_body, version)
    await quiesce(settings)
    young, young_body = await new_patient("Short")
    early: list[float] = []
    late: list[float] = []
    for i in range(50):
        early.append(await change(young, young_body, 2 + i))
        late.append(await change(old, old_body, HISTORY + 1 + i))
    await conn.close()
    return percentile(early, 0.5) * 1000, percentile(late, 0.5) * 1000


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _one_worker_query_api(
    settings: Settings, port: int, command: tuple[str, ...] = SERVE_READ_API, **extra: str
) -> subprocess.Popen[bytes]:
    """A query API process of one worker on `port`, started by `command` (python's
    arguments), once it is ready."""
    env = {
        **os.environ,
        "CARELOG_READ_API_PORT": str(port),
        "CARELOG_READ_API_WORKERS": "1",
        **extra,
    }
    process = subprocess.Popen(  # noqa: S603 (our own arguments)
        [sys.executable, *command],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    os.killpg(process.pid, 9)
    raise RuntimeError("the one-worker query API did not start")


async def run(settings: Settings) -> list[str]:
    commands = f"http://127.0.0.1:{settings.ports['commands']}"
    reads = f"http://127.0.0.1:{settings.ports['read-api']}"
    gateway = f"http://127.0.0.1:{settings.gateway_port}"
    auth_url = os.environ.get("CARELOG_AUTH_URL", f"http://127.0.0.1:{settings.ports['auth']}")
    admin = await token_headers(auth_url)
    staff = await bench_users(gateway, auth_url, CONCURRENCY, role="receptionist")
    run_id = uuid.uuid4().hex[:6]

    floor = await insert_floor(settings)

    warmup = await _warm_up(commands, register_script([admin], f"{run_id}w"))
    register: dict[str, list[Round]] = {"direct": [], "gateway": []}
    lags: list[float] = []
    for r in range(ROUNDS):
        register["direct"].append(
            await _wrk_round(
                commands,
                register_script([admin], f"{run_id}d{r}"),
                ROUND_SECONDS,
                lambda stop: _probe(settings, commands, admin, stop),
            )
        )
        lags += register["direct"][-1].lags
        register["gateway"].append(
            await _wrk_round(
                gateway,
                register_script(staff, f"{run_id}g{r}", "/api/patients"),
                ROUND_SECONDS,
            )
        )

    ids = await _patients(commands, admin, UPDATE_PATIENTS)
    with tempfile.NamedTemporaryFile("w", suffix=".ids", delete=False) as file:
        file.write("\n".join(ids) + "\n")
    ids_file = Path(file.name)
    update: dict[str, list[Round]] = {"direct": [], "gateway": []}
    try:
        for r in range(ROUNDS):
            update["direct"].append(
                await _wrk_round(
                    commands, update_script([admin], ids_file, f"{run_id}d{r}"), ROUND_SECONDS
                )
            )
            update["gateway"].append(
                await _wrk_round(
                    gateway,
                    update_script(staff, ids_file, f"{run_id}g{r}", "/api/patients/"),
                    ROUND_SECONDS,
                )
            )
    finally:
        await asyncio.to_thread(ids_file.unlink, missing_ok=True)

    early, late = await _history(settings, commands, admin)

    one_port = settings.ports["read-api"] + 100
    single = _one_worker_query_api(settings, one_port)
    listing: dict[str, list[Round]] = {"workers": [], "one": []}
    try:
        for _ in range(ROUNDS):
            for name, base in (("workers", reads), ("one", f"http://127.0.0.1:{one_port}")):
                listing[name].append(
                    await _wrk_round(base, get_script([admin], "/patients?limit=50"), 5.0)
                )
    finally:
        os.killpg(single.pid, 15)
        single.wait(15)

    # The same query API with its Redis gone (a port where nothing listens): the breaker
    # opens after a few failed calls and every read is answered from PostgreSQL.
    dead = urlsplit(settings.redis_url)._replace(netloc=f"127.0.0.1:{_free_port()}").geturl()
    cacheless = _one_worker_query_api(settings, one_port, CARELOG_REDIS_URL=dead)
    try:
        without_redis = [
            await _wrk_round(
                f"http://127.0.0.1:{one_port}", get_script([admin], "/patients?limit=50"), 5.0
            )
            for _ in range(ROUNDS)
        ]
    finally:
        os.killpg(cacheless.pid, 15)
        cacheless.wait(15)

    cached_p99 = _median(listing["one"], lambda r: r.result.p99_ms)
    cacheless_p99 = _median(without_redis, lambda r: r.result.p99_ms)
    floor_rate = floor.rate
    reg = _median(register["direct"], lambda r: r.result.rate)
    lines = [
        "## Writes: register and update, CPU per operation",
        "",
        f"`uv run python -m bench.writes` (part of `make bench`). wrk, {CONCURRENCY} keep-alive"
        f" connections; medians of {ROUNDS} alternating rounds of {ROUND_SECONDS:.0f} s, after"
        f" {warmup[0]} register rounds of {WARMUP_SECONDS:.0f} s not counted (until the"
        f" broker's JIT compiler had settled: {warmup[1]:.3f} cores in the last; at most"
        f" {WARMUP_ROUNDS}). The relay, every projection,"
        " billing and the notifier run throughout on the same cores, handling every event the"
        " writes make. Each round starts on a settled stack (under a quarter of a core for a"
        " second). CPU per operation is the CPU time of every process of the stack (carelog's,"
        " PostgreSQL, Kafka, Redis, the gateway), from /proc, from the round's start until the"
        " stack has settled again after it (the consumers' backlog worked off: median"
        f" {_median(register['direct'], lambda r: r.drained):.1f} s after a direct register"
        " round), divided by the 2xx answers. The load generator and the local SMTP capture"
        " are counted apart (they stand in for the clients and the practice's mail relay).",
        "",
        "| figure | rate, latency | CPU per operation |",
        "| --- | --- | --- |",
        _row("register, direct (POST :4000/patients)", register["direct"]),
        _row("register, through the gateway (POST :4004/api/patients)", register["gateway"]),
        _row(f"update, direct (PUT, {len(ids)} patients in turn)", update["direct"]),
        _row("update, through the gateway", update["gateway"]),
        "",
        f"Floor, same run: single-row INSERT, own transaction: {floor_rate:.0f}/s, "
        f"p99 {ms(floor.p(0.99))}; register direct is {reg / floor_rate:.0%} of it.",
        "",
        f"Event → directory row and billing account, while registering at full rate "
        f"({len(lags)} probes): p50 {ms(percentile(lags, 0.5) * 1000)}, "
        f"p99 {ms(percentile(lags, 0.99) * 1000)}.",
        "",
        "Milliseconds of CPU per registration by process, the median register round"
        f" (direct) and its drain: {_per_process(register['direct'])}.",
        "",
        "Milliseconds of CPU per update by process, the median update round (direct) and its"
        f" drain: {_per_process(update['direct'])}.",
        "",
        f"Update cost by history: PUTs taking turns on two patients, p50 {ms(early)} at"
        f" versions 2-51 and p50 {ms(late)} at versions {HISTORY + 1}-{HISTORY + 50}:"
        f" {late / early:.2f}x.",
        "",
        f"Reads per core: list patients (first page, 50) with the query API's "
        f"{settings.read_api_workers} worker processes "
        f"{_median(listing['workers'], lambda r: r.result.rate):.0f}/s "
        f"(p99 {ms(_median(listing['workers'], lambda r: r.result.p99_ms))}), beside one "
        f"process started for the comparison "
        f"{_median(listing['one'], lambda r: r.result.rate):.0f}/s "
        f"(p99 {ms(_median(listing['one'], lambda r: r.result.p99_ms))}).",
        "",
        f"Without Redis: the one-process query API with its Redis unreachable answers the"
        f" same reads from PostgreSQL behind its open breaker: "
        f"{_median(without_redis, lambda r: r.result.rate):.0f}/s, p99 {ms(cacheless_p99)}, "
        f"{sum(r.result.failed for r in without_redis)} failed; beside the same process"
        f" with Redis: p99 {ms(cached_p99)} ({cacheless_p99 / cached_p99:.2f}x; aim: at most"
        " 2x, and no 5xx).",
        "",
        "Aims (issue): register 1,650/s direct and 1,050/s through the gateway; update"
        " 2,650/s and 1,300/s; at most 1.1 ms of CPU per registration and 0.7 ms per update;"
        " lag p99 under 100 ms; PUT p50 at version 1,000 at most 1.2x that at version 2.",
        "",
        *PROFILE.read_text().splitlines(),
    ]
    return lines


def main() -> None:
    main_for(run)


if __name__ == "__main__":
    main()
