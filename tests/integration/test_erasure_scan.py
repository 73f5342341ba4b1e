"""After an erasure no copy holds the patient's personal data (real PostgreSQL, Kafka, Redis,
SMTP): a patient registered with unique markers, booked and billed, is erased; then every
table of the test's database, every Kafka topic of its prefix from the beginning, every
Redis key, the Maildir and every log file (the processes the test started, its own output
and PostgreSQL's server log) is scanned for the markers.

A control patient, never erased, carries markers of its own: they are found where the
clear copies belong (the directory, the cache, its welcome mail), so the scan can see.

Mail: a message delivered to the patient's mailbox has left the practice and cannot be
recalled. The notifier starts after the erasure here: what was still to be sent to the
erased patient never goes out, while the control patient's mail does.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from grpclib.client import Channel
from litestar.testing import AsyncTestClient
from psycopg import sql

from billing_grpc.config import BillingConfig
from billing_grpc.generated.carelog.billing import v1 as pb
from bootstrap.billing import start as start_billing
from commands.api import create_app as commands_app
from commands.store import EventStore
from domain.roles import Role
from read_api.app import create_app as read_app
from runtime.cache import redis_for
from runtime.crypto import Keyring
from runtime.kafka import client_options
from runtime.settings import Settings
from tests.support.billing import account_if_any, bearer
from tests.support.stack import ROOT, Process, env_for, eventually, free_port
from tests.support.tokens import TestTokens

pytestmark = pytest.mark.integration

ALWAYS = {d: [["00:00", "24:00"]] for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}


def postgres_log() -> Path:
    """PostgreSQL's server log, as the local stack writes it (this checkout's, or the main
    checkout's for a git worktree)."""
    common = subprocess.run(
        ["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    candidates = [ROOT / ".stack/logs/postgres.log"]
    if common:
        candidates.append(Path(common).parent / ".stack/logs/postgres.log")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    pytest.fail(f"PostgreSQL's log is not where the local stack writes it: {candidates}")


def person(marker: str) -> dict[str, Any]:
    return {
        "name": f"Mx {marker}given {marker}family",
        "email": f"{marker}mail@example.org",
        "address": f"{marker}street, Town",
        "dateOfBirth": "1985-03-04",
        "registeredDate": "2024-01-02",
    }


def as_text(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        return raw.decode("utf-8", "replace") + raw.hex()
    if isinstance(value, dict | list):
        return json.dumps(value, default=str)
    return str(value)


def tables_text(settings: Settings) -> Iterator[tuple[str, str]]:
    """(table, its rows as text) for every table of the test's database."""
    with psycopg.connect(settings.database_url) as conn:
        tables = conn.execute(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_type = 'BASE TABLE'"
            " AND table_schema NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
        assert len(tables) > 10
        for schema, table in tables:
            rows = conn.execute(
                sql.SQL("SELECT * FROM {}.{}").format(sql.Identifier(schema), sql.Identifier(table))
            ).fetchall()
            yield f"{schema}.{table}", "\n".join(" ".join(as_text(v) for v in r) for r in rows)


async def kafka_text(settings: Settings) -> dict[str, str]:
    """Every topic of the test's prefix, read from the beginning to its end."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        topics = [t for t in await admin.list_topics() if t.startswith(settings.topic_prefix)]
        described = await admin.describe_topics(topics)
    finally:
        await admin.close()
    assert any(t.endswith("patient.events") for t in topics), topics
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        partitions = [
            TopicPartition(d["topic"], p["partition"]) for d in described for p in d["partitions"]
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        text: dict[str, list[str]] = {t: [] for t in topics}

        async def behind() -> bool:
            for tp, end in ends.items():
                if await consumer.position(tp) < end:
                    return True
            return False

        while await behind():
            batch = await consumer.getmany(timeout_ms=1000)
            for tp, records in batch.items():
                for r in records:
                    headers = " ".join(f"{k}={as_text(v)}" for k, v in r.headers or ())
                    text[tp.topic].append(f"{as_text(r.key)} {as_text(r.value)} {headers}")
        return {t: "\n".join(lines) for t, lines in text.items()}
    finally:
        await consumer.stop()


async def redis_text(settings: Settings) -> str:
    client = redis_for(settings)
    try:
        parts: list[str] = []
        async for key in client.scan_iter(count=1000):
            kind = as_text(await client.type(key))
            value: Any = None
            if "string" in kind:
                value = await client.get(key)
            elif "hash" in kind:
                value = await client.hgetall(key)
            elif "list" in kind:
                value = await client.lrange(key, 0, -1)
            elif "set" in kind and "zset" not in kind:
                value = await client.smembers(key)
            elif "zset" in kind:
                value = await client.zrange(key, 0, -1)
            parts.append(f"{as_text(key)} {as_text(value) if value is not None else ''}")
        return "\n".join(parts)
    finally:
        await client.aclose()


def rebuild_directory(settings: Settings, tmp_path: Path) -> None:
    rebuilt = subprocess.run(
        [sys.executable, "-m", "bootstrap", "projections", "rebuild", "directory", "--yes"],
        env=env_for(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    (tmp_path / "rebuild.log").write_text(rebuilt.stdout + rebuilt.stderr)
    assert rebuilt.returncode == 0, rebuilt.stderr


def files_text(maildir: Path, logs: Path, pg_log: Path) -> dict[str, str]:
    """The Maildir's files, the test's log files and PostgreSQL's log, as text."""
    places = {
        f"mail {p.name}": p.read_text("utf-8", "replace") for p in maildir.rglob("*") if p.is_file()
    }
    places.update({f"log {p.name}": p.read_text("utf-8", "replace") for p in logs.glob("*.log")})
    places["postgres log"] = pg_log.read_text("utf-8", "replace")
    return places


async def test_after_an_erasure_no_copy_holds_the_patients_markers(
    own_settings: Settings, tmp_path: Path, tokens: TestTokens, capfd: pytest.CaptureFixture[str]
):
    settings = own_settings
    erased_mark, kept_mark = f"zq{uuid.uuid4().hex[:14]}", f"zk{uuid.uuid4().hex[:14]}"
    pg_log = postgres_log()
    keyring = Keyring.from_settings(settings)
    store = EventStore(settings.database_url, keyring=keyring)
    redis_before_rebuild = ""
    maildir = tmp_path / "mail"
    smtp, mail_health = free_port(), free_port()
    catcher_log = (tmp_path / "mailcatcher.log").open("wb")
    catcher = subprocess.Popen(  # noqa: ASYNC220 (started once; stopped below)
        [
            sys.executable,
            "-m",
            "ops.local.mailcatcher",
            str(maildir),
            "--smtp-port",
            str(smtp),
            "--health-port",
            str(mail_health),
        ],
        cwd=ROOT,
        env=env_for(settings),
        stdout=catcher_log,
        stderr=subprocess.STDOUT,
    )
    processes = [
        Process(["relay"], settings, "relay", tmp_path / "relay"),
        Process(["project", "directory"], settings, "projection", tmp_path / "directory"),
        Process(["project", "appointments"], settings, "appointments", tmp_path / "appts"),
        Process(["project", "analytics"], settings, "analytics", tmp_path / "analytics"),
    ]
    notifier = Process(
        ["notify"],
        settings,
        "notifier",
        tmp_path / "notifier",
        env={"CARELOG_SMTP_PORT": str(smtp), "CARELOG_PRACTICE_NAME": "Test Practice"},
    )
    billing = await start_billing(
        settings,
        BillingConfig(
            grpc_port=settings.ports["billing-grpc"], http_port=settings.ports["billing-http"]
        ),
        verifier=tokens.verifier,
    )
    channel = Channel("127.0.0.1", settings.ports["billing-grpc"])
    stub = pb.BillingServiceStub(channel, timeout=10, metadata=bearer(tokens))
    try:
        for process in processes:
            process.start()
        async with (
            AsyncTestClient(app=commands_app(settings, store, verifier=tokens.verifier)) as writes,
            AsyncTestClient(app=read_app(settings, verifier=tokens.verifier)) as reads,
        ):
            writes.headers.update(tokens.headers(Role.ADMIN, subject="admin-scan"))
            reads.headers.update(tokens.headers(Role.ADMIN))
            doctor = await writes.post(
                "/clinicians",
                json={
                    "name": "Dr Scan",
                    "email": f"dr-{uuid.uuid4().hex[:8]}@example.org",
                    "timezone": "UTC",
                    "workingHours": ALWAYS,
                },
            )
            assert doctor.status_code == 201, doctor.text
            start = datetime.now(UTC).replace(microsecond=0, second=0) + timedelta(days=3)
            ids: dict[str, str] = {}
            booked: dict[str, str] = {}
            for n, mark in enumerate((erased_mark, kept_mark)):
                registered = await writes.post("/patients", json=person(mark))
                assert registered.status_code == 201, registered.text
                ids[mark] = registered.json()["id"]
                registered_at = registered.json()["position"]
                booking = await writes.post(
                    "/appointments",
                    json={
                        "patientId": ids[mark],
                        "clinicianId": doctor.json()["id"],
                        "start": (start + timedelta(hours=n)).isoformat(),
                        "durationMinutes": 30,
                        "reason": f"{mark}reason",
                    },
                )
                assert booking.status_code == 201, booking.text
                booked[mark] = booking.json()["id"]
                position = booking.json()["position"]
                # Reads fill the cache: one patient, and a page that shows them.
                seen = await reads.get(
                    f"/patients/{ids[mark]}", params={"minPosition": registered_at}
                )
                assert seen.status_code == 200 and seen.json()["name"] == person(mark)["name"]
                page = await reads.get("/patients", params={"name": "Mx"})
                assert page.status_code == 200
                appointment = await reads.get(
                    f"/appointments/{booked[mark]}", params={"minPosition": position}
                )
                assert appointment.json()["reason"] == f"{mark}reason"  # sealed, then opened
                account = await eventually(lambda m=mark: account_if_any(stub, ids[m]), 60)
                await stub.create_invoice(
                    pb.CreateInvoiceRequest(
                        account_id=account.account_id,
                        currency_code="GBP",
                        lines=[
                            pb.InvoiceLine(
                                description=f"{mark}consultation",
                                quantity=1,
                                unit_amount_minor=5000,
                            )
                        ],
                    )
                )

            erased = await writes.post(
                f"/patients/{ids[erased_mark]}/erase", json={"reason": "request E-1"}
            )
            assert erased.status_code == 200, erased.text
            position = erased.json()["position"]
            gone = await reads.get(
                f"/patients/{ids[erased_mark]}", params={"minPosition": position}
            )
            assert gone.status_code == 410, gone.text
            again = await reads.get(f"/patients/{ids[erased_mark]}")  # from the cache now
            assert again.status_code == 410

            async def reason_gone() -> bool:
                shown = await reads.get(f"/appointments/{booked[erased_mark]}")
                return shown.status_code == 200 and shown.json()["reason"] is None

            assert await eventually(reason_gone, 30)
            kept = await reads.get(f"/patients/{ids[kept_mark]}")
            assert kept.status_code == 200

            def billing_blanked() -> bool:
                with psycopg.connect(settings.database_url) as conn:
                    row = conn.execute(
                        "SELECT name, email FROM billing.accounts WHERE patient_id = %s",
                        [ids[erased_mark]],
                    ).fetchone()
                return row == ("", "")

            assert await eventually(lambda: asyncio.to_thread(billing_blanked), 60)

            def analytics_forgot() -> bool:
                with psycopg.connect(settings.database_url) as conn:
                    row = conn.execute(
                        "SELECT date_of_birth, version FROM analytics_patients WHERE id = %s",
                        [ids[erased_mark]],
                    ).fetchone()
                return row is not None and row[0] is None and row[1] == 2

            assert await eventually(lambda: asyncio.to_thread(analytics_forgot), 60)

            notifier.start()

            def mail_settled() -> bool:
                with psycopg.connect(settings.database_url) as conn:
                    states = conn.execute("SELECT patient_id, status FROM notifications").fetchall()
                sent = {str(p) for p, s in states if s == "sent"}
                return ids[kept_mark] in sent and all(s in ("sent", "given-up") for _, s in states)

            assert await eventually(lambda: asyncio.to_thread(mail_settled), 90)

        # The cache as the erasure left it (a rebuild forgets every cached patient).
        redis_before_rebuild = await redis_text(settings)
        # A rebuild from the store brings nothing back.
        await asyncio.to_thread(rebuild_directory, settings, tmp_path)
        with psycopg.connect(settings.database_url) as conn:
            row = conn.execute(
                "SELECT erased, name FROM directory_patients WHERE id = %s", [ids[erased_mark]]
            ).fetchone()
        assert row == (True, "")
    finally:
        for process in [*processes, notifier]:
            process.stop()
        channel.close()
        await billing.stop()
        catcher.terminate()
        catcher.wait(10)
        catcher_log.close()
        store.close()
        keyring.close()

    captured = capfd.readouterr()
    places: dict[str, str] = {}
    places.update({f"table {t}": text for t, text in tables_text(settings)})
    places.update({f"topic {t}": text for t, text in (await kafka_text(settings)).items()})
    places["redis"] = redis_before_rebuild
    places["redis, after the rebuild"] = await redis_text(settings)
    places.update(files_text(maildir, tmp_path, pg_log))
    places["test output"] = captured.out + captured.err

    holding = sorted(place for place, text in places.items() if erased_mark in text)
    assert holding == [], f"the erased patient's data is still readable in {holding}"
    # The scan sees: the patient never erased is in the clear where clear copies belong.
    control = {place for place, text in places.items() if kept_mark in text}
    assert "table public.directory_patients" in control
    assert "table billing.accounts" in control
    assert "redis" in control
    assert any(place.startswith("mail ") for place in control)
    # ... and sealed in the store and on Kafka.
    assert not any(place.startswith("topic ") for place in control), control
    assert "table public.carelog_events" not in control
    assert "table public.carelog_snapshots" not in control
