"""Kill -9 under write load: the command API, and a PostgreSQL server and a Kafka broker
of the test's own.

Several clients register patients concurrently through a command API with its relay, the
patient directory projection and billing behind it (real processes on an isolated
database and topic prefix). Mid-flow the command API, or the PostgreSQL server holding the
event store, is SIGKILLed and started again; the clients keep going (a request that fails
because of the kill is retried with a new email). Afterwards:

- every patient that got a 201 is registered exactly once in the event store, is in the
  directory read model, and has exactly one billing account;
- nothing is half-written: every registration in the store has its email claim and every
  claim its patient (a registration is one transaction), and every registration in the
  store, answered or not, reached the directory and billing.

The shared PostgreSQL and Kafka are never killed: the PostgreSQL test runs a private
cluster (initdb on a free port, migrated with `carelog db migrate`), the Kafka test a
private one-node broker from the stack's jars (formatted in a temporary directory).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

import httpx
import psycopg
import pytest

from domain.patients import email_claim_id
from domain.roles import Role
from runtime.settings import Settings
from tests.support.patients import body
from tests.support.stack import (
    ROOT,
    Process,
    claim_key,
    eventually,
    free_port,
    isolated_settings,
    with_own_auth,
)
from tests.support.tokens import TestTokens

pytestmark = [pytest.mark.integration, pytest.mark.fault]

CLIENTS = 6
ROUNDS = 3
PER_ROUND = 40
"""201s wanted between two kills."""
PG_BIN = Path("/usr/lib/postgresql/15/bin")
SERVER_OPTIONS = ("listen_addresses=127.0.0.1", "fsync=on", "max_connections=200")


@dataclass
class Load:
    """What the clients saw: the 201s (patient id → email), every email they tried, and the
    emails refused as taken although no other request ever sent them."""

    created: dict[str, str] = field(default_factory=dict)
    tried: list[str] = field(default_factory=list)
    failed: int = 0
    refused_own: list[str] = field(default_factory=list)


async def register_until(stop: asyncio.Event, url: str, headers: dict[str, str], load: Load):
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        while not stop.is_set():
            request = body()
            load.tried.append(request["email"])
            try:
                answer = await client.post("/patients", json=request)
            except httpx.TransportError:
                load.failed += 1  # the kill: try again, as a new registration
                await asyncio.sleep(0.05)
                continue
            if answer.status_code == 201:
                load.created[answer.json()["id"]] = request["email"]
            elif answer.status_code == 409 and "email" in answer.json().get("errors", {}):
                load.refused_own.append(request["email"])  # each email is sent once only
            elif answer.status_code == 503:
                load.failed += 1  # a dependency is down: the service says so
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"{answer.status_code}: {answer.text}")


@dataclass
class Pipeline:
    settings: Settings
    processes: dict[str, Process]
    headers: dict[str, str]

    @property
    def commands(self) -> str:
        return f"http://127.0.0.1:{self.settings.ports['commands']}"


@contextmanager
def pipeline(settings: Settings, tmp: Path) -> Iterator[Pipeline]:
    """Auth (for the keys), the command API, the relay, the directory and billing."""
    settings, env = with_own_auth(settings, tmp / "keys")
    tokens = TestTokens(tmp / "keys")
    processes: dict[str, Process] = {}
    try:
        for name, args, port in (
            ("auth", ["serve", "auth"], "auth"),
            ("commands", ["serve", "commands"], "commands"),
            ("relay", ["relay"], "relay"),
            ("directory", ["project", "directory"], "projection"),
            ("billing", ["serve", "billing"], "billing-http"),
        ):
            processes[name] = Process(args, settings, port, tmp / name, env=env)
            processes[name].start()
        yield Pipeline(settings, processes, tokens.headers(Role.RECEPTIONIST))
    finally:
        for process in reversed(processes.values()):
            process.stop()


async def under_load(line: Pipeline, kill_and_restart) -> Load:
    """Runs the clients, calling `kill_and_restart()` (in a thread) after each round."""
    load = Load()
    stop = asyncio.Event()
    clients = [
        asyncio.create_task(register_until(stop, line.commands, line.headers, load))
        for _ in range(CLIENTS)
    ]
    try:
        for round_ in range(1, ROUNDS + 1):

            async def enough(wanted: int = round_ * PER_ROUND) -> bool:
                for client in clients:
                    if client.done():
                        client.result()  # a client that failed fails the test
                return len(load.created) >= wanted

            await eventually(enough, timeout=120)
            await asyncio.to_thread(kill_and_restart)
        await eventually(lambda: _more_than(load, (ROUNDS + 1) * PER_ROUND), timeout=120)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    return load


async def _more_than(load: Load, wanted: int) -> bool:
    return len(load.created) >= wanted


def registrations(database_url: str) -> tuple[list[UUID], list[UUID]]:
    """(patients registered, email claims created) in the event store, one entry per event."""
    with psycopg.connect(database_url) as db:
        rows = db.execute(
            "SELECT originator_id, topic FROM carelog_events WHERE originator_version = 1"
        ).fetchall()
    patients = [id_ for id_, topic in rows if topic.endswith("Patient.Registered")]
    claims = [id_ for id_, topic in rows if topic.endswith("EmailClaim.Created")]
    assert len(patients) + len(claims) == len(rows), {topic for _, topic in rows}
    return patients, claims


async def check_nothing_lost_or_doubled(database_url: str, load: Load) -> None:
    patients, claims = registrations(database_url)
    key = claim_key()
    assert len(set(patients)) == len(patients)
    answered = {UUID(p) for p in load.created}
    assert answered <= set(patients), "a 201 without its registration in the store"
    # One transaction: as many claims as registrations, each on an email some client sent.
    tried = {email_claim_id(email, key) for email in load.tried}
    assert {email_claim_id(email, key) for email in load.created.values()} <= set(claims)
    # An email refused as taken was taken by this very request's earlier attempt.
    assert {email_claim_id(email, key) for email in load.refused_own} <= set(claims)
    assert len(claims) == len(set(claims)) == len(patients)
    assert set(claims) <= tried

    def projected() -> tuple[set[UUID], list[UUID]]:
        with psycopg.connect(database_url) as db:
            directory = {row[0] for row in db.execute("SELECT id FROM directory_patients")}
            accounts = [row[0] for row in db.execute("SELECT patient_id FROM billing.accounts")]
        return directory, accounts

    async def settled() -> bool:
        directory, accounts = await asyncio.to_thread(projected)
        return directory == set(patients) and len(accounts) == len(patients)

    await eventually(settled, timeout=120)
    directory, accounts = projected()
    assert directory == set(patients)
    assert sorted(accounts) == sorted(patients), "a patient without, or with two, accounts"


async def test_a_killed_command_api_loses_and_doubles_nothing(tmp_path: Path):
    with isolated_settings("kc") as settings, pipeline(settings, tmp_path) as line:
        commands = line.processes["commands"]

        def kill_and_restart() -> None:
            commands.kill()  # SIGKILL to the server and its workers, mid-request
            commands.start()

        load = await under_load(line, kill_and_restart)
        assert commands.starts == ROUNDS + 1
        assert load.failed > 0, "no request was cut by a kill"
        await check_nothing_lost_or_doubled(settings.database_url, load)
        assert load.refused_own == []


def _as_postgres(args: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as the postgres user."""
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def _children(parent: int) -> list[int]:
    """The pids of `parent`'s child processes (from /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            children.append(int(entry.name))
    return children


def _alive(pid: int) -> bool:
    """Whether `pid` still runs (a zombie counts as gone: it holds no shared memory)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster of the test's own; `kill()` is SIGKILL to every one of its
    processes (postmaster and backends), `start()` recovers from its WAL."""

    directory: Path
    port: int
    popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://carelog:carelog@127.0.0.1:{self.port}/carelog"

    def init(self) -> None:
        subprocess.run(
            _as_postgres(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(self.directory / "data"),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ]
            ),
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        log = (self.directory / "postgres.log").open("ab")
        # Started as the postgres user directly (no runuser between), so the pid is the
        # postmaster's and this test reaps it: a restart finds no live pid in its lock file.
        self.popen = subprocess.Popen(
            [str(PG_BIN / "postgres"), "-D", str(self.directory / "data")]
            + ["-p", str(self.port), "-k", str(self.directory)]
            + [arg for option in SERVER_OPTIONS for arg in ("-c", option)],
            user="postgres" if os.geteuid() == 0 else None,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with psycopg.connect(
                    f"postgresql://postgres@127.0.0.1:{self.port}/postgres", connect_timeout=1
                ):
                    return
            except psycopg.OperationalError:
                if self.popen.poll() is not None or time.monotonic() > deadline:
                    log = (self.directory / "postgres.log").read_text()[-3000:]
                    raise RuntimeError(f"PostgreSQL did not start: {log}") from None
                time.sleep(0.1)

    def kill(self) -> None:
        assert self.popen is not None
        # PostgreSQL's server processes each lead a process group of their own (setsid),
        # so the postmaster's group is the postmaster alone: each is killed by its pid.
        server = [self.popen.pid, *_children(self.popen.pid)]
        for pid in server:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.popen.wait(10)
        # Until every server process is gone: a backend still holding the shared memory
        # would stop the restart ("pre-existing shared memory block is still in use").
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in server[1:]):
            time.sleep(0.05)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGTERM)  # smart shutdown
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    if not (PG_BIN / "postgres").exists():
        pytest.skip(f"no PostgreSQL 15 server binaries in {PG_BIN}")
    directory = Path(tempfile.mkdtemp(prefix="carelog-pg-"))
    directory.chmod(0o755)
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")
    server = PrivatePostgres(directory, free_port())
    try:
        server.init()
        server.start()
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{server.port}/postgres", autocommit=True
        ) as admin:
            admin.execute("CREATE ROLE carelog LOGIN PASSWORD 'carelog'")
            admin.execute("CREATE DATABASE carelog OWNER carelog")
        subprocess.run(
            [sys.executable, "-m", "bootstrap", "db", "migrate"],
            env={**os.environ, "CARELOG_ENV": "development", "CARELOG_DATABASE_URL": server.url},
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        yield server
    finally:
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


async def test_a_killed_postgresql_loses_and_doubles_nothing(tmp_path: Path):
    with (
        private_postgres() as postgres,
        isolated_settings("kp") as isolated,  # its topics and ports; its database unused
    ):
        settings = isolated.with_(database_url=postgres.url)
        with pipeline(settings, tmp_path) as line:

            def kill_and_restart() -> None:
                postgres.kill()  # every server process at once, mid-transaction
                postgres.start()

            load = await under_load(line, kill_and_restart)
            for name, process in line.processes.items():
                assert process.popen is not None and process.popen.poll() is None, (
                    f"{name} did not survive the database's restart: {process.tail()}"
                )
            await check_nothing_lost_or_doubled(postgres.url, load)
            # A COMMIT whose acknowledgement the kill cut is retried by the store, and the
            # retry conflicts with the registration that did commit: the client must still
            # get its 201, never 409 "email already registered" for its own patient.
            assert not load.refused_own, (
                f"{len(load.refused_own)} registration(s) stored but answered 409"
            )


KAFKA_LIBS = ROOT / ".stack" / "kafka" / "libs"


@dataclass
class PrivateKafka:
    """A one-node KRaft broker of the test's own, PLAINTEXT on free ports, its data in a
    temporary directory: killing it disturbs nobody else."""

    directory: Path
    port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    popen: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _java(self, *args: str) -> list[str]:
        return [
            "java",
            "-Xmx512m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.directory}",
            f"-Dlog4j.configuration=file:{ROOT / 'ops' / 'local' / 'kafka' / 'log4j.properties'}",
            "-cp",
            f"{KAFKA_LIBS}/*",
            *args,
        ]

    def format(self) -> None:
        config = self.directory / "server.properties"
        config.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
                    f"listeners=PLAINTEXT://127.0.0.1:{self.port},"
                    f"CONTROLLER://127.0.0.1:{self.controller_port}",
                    f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
                    "controller.listener.names=CONTROLLER",
                    "inter.broker.listener.name=PLAINTEXT",
                    "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
                    f"log.dirs={self.directory / 'data'}",
                    "auto.create.topics.enable=false",
                    "num.partitions=1",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=3",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                ]
            )
            + "\n"
        )
        cluster = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", cluster, "-c", str(config)),
            check=True,
            capture_output=True,
            timeout=120,
        )

    def start(self) -> None:
        log = (self.directory / "kafka.log").open("ab")
        self.popen = subprocess.Popen(
            self._java("kafka.Kafka", str(self.directory / "server.properties")),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        # Its own event loop, in a thread: the caller may be running one already.
        with ThreadPoolExecutor(1) as waiter:
            waiter.submit(asyncio.run, self._wait_ready()).result()

    async def _wait_ready(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        deadline = time.monotonic() + 120
        while True:
            assert self.popen is not None
            if self.popen.poll() is not None:
                raise RuntimeError(f"Kafka exited: {self.tail()}")
            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=2000)
            try:
                await admin.start()
                await admin.list_topics()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Kafka did not start: {self.tail()}") from None
                await asyncio.sleep(0.5)
            finally:
                await admin.close()

    def kill(self) -> None:
        assert self.popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def tail(self) -> str:
        path = self.directory / "kafka.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


@contextmanager
def private_kafka() -> Iterator[PrivateKafka]:
    if not KAFKA_LIBS.is_dir() or shutil.which("java") is None:
        pytest.skip(f"no Kafka jars in {KAFKA_LIBS} or no java (`make up` installs them)")
    directory = Path(tempfile.mkdtemp(prefix="carelog-kafka-"))
    broker = PrivateKafka(directory)
    try:
        broker.format()
        broker.start()
        yield broker
    finally:
        broker.kill()
        shutil.rmtree(directory, ignore_errors=True)


async def test_a_killed_kafka_loses_and_doubles_nothing(tmp_path: Path):
    """The relay, the directory and billing lose their broker mid-flow: afterwards every
    registration still reached both, once, and the command API never stopped answering."""
    with private_kafka() as kafka, isolated_settings("kk") as isolated:
        settings = isolated.with_(
            kafka_bootstrap=kafka.bootstrap,
            kafka_security_protocol="PLAINTEXT",
            kafka_username="",
            kafka_password="",
        )
        with pipeline(settings, tmp_path) as line:

            def kill_and_restart() -> None:
                kafka.kill()
                time.sleep(1.0)  # the relay and the consumers notice the broker is gone
                kafka.start()

            load = await under_load(line, kill_and_restart)
            for name, process in line.processes.items():
                assert process.popen is not None and process.popen.poll() is None, (
                    f"{name} did not survive the broker's restart: {process.tail()}"
                )
            await check_nothing_lost_or_doubled(settings.database_url, load)
            assert load.refused_own == []
