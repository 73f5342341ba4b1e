"""`carelog projections rebuild` on the real event store, Kafka and PostgreSQL: under load,
killed halfway and resumed, refusing a corrupted model, rolled back."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import threading
import time
import uuid
from datetime import date
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from litestar.testing import AsyncTestClient

from commands.service import PatientService
from commands.store import EventStore
from domain.roles import Role
from read_api.app import create_app as read_app
from runtime.settings import Settings
from tests.support.patients import details
from tests.support.stack import ROOT, Process, claim_key, env_for
from tests.support.tokens import TestTokens


def carelog(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bootstrap", *args],
        env=env_for(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def start(settings: Settings, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bootstrap", *args],
        env=env_for(settings),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def rows(settings: Settings, table: str = "directory_patients") -> dict[UUID, tuple[Any, ...]]:
    with psycopg.connect(settings.database_url) as conn:
        return {
            r[0]: r[1:]
            for r in conn.execute(f"SELECT id, version, name, email, address, removed FROM {table}")
        }


def exists(settings: Settings, table: str) -> bool:
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", [table]).fetchone()
        return bool(row and row[0])


def write_some(service: PatientService, count: int, rng: random.Random) -> list[UUID]:
    made = []
    for _ in range(count):
        made.append(service.register(details(), date(2024, 1, 2)).patient_id)
        if made and rng.random() < 0.3:
            target = rng.choice(made)
            service.change(target, details(name=f"Changed {rng.randrange(10**6)}"))
    return made


async def settled(settings: Settings, store: EventStore, timeout: float = 60) -> None:
    """Until the live directory holds the version of every patient in the store."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with psycopg.connect(settings.database_url) as conn:
            behind = conn.execute("SELECT count(*) FROM directory_positions").fetchone()
        live = rows(settings)
        expected = {
            e.originator_id
            for n in store.recorder.select_notifications(1, 100_000)
            if type(e := store.mapper.to_domain_event(n)).__qualname__ == "Patient.Registered"
        }
        if expected <= set(live) and behind:
            return
        await asyncio.sleep(0.2)
    raise AssertionError("the live directory did not catch up")


async def test_a_rebuild_under_read_and_write_load_swaps_in_an_equal_copy(
    own_settings: Settings, own_store: EventStore, tokens: TestTokens, tmp_path: Path
):
    settings, store = own_settings, own_store
    service = PatientService(store, claim_key())
    rng = random.Random(5)
    write_some(service, 300, rng)
    relay = Process(["relay"], settings, "relay", tmp_path / "relay").start()
    projection = Process(["project", "directory"], settings, "projection", tmp_path / "p").start()
    written: list[UUID] = []
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            written.extend(write_some(service, 5, rng))
            time.sleep(0.05)

    failures: list[int] = []
    answered = 0
    try:
        await settled(settings, store)
        thread = threading.Thread(target=writer)
        thread.start()
        app = read_app(settings, verifier=tokens.verifier)
        async with AsyncTestClient(app=app) as reads:
            reads.headers.update(tokens.headers(Role.CLINICIAN))
            rebuild = start(settings, "projections", "rebuild", "directory", "--yes", "--json")
            while rebuild.poll() is None:
                answer = await reads.get(
                    "/patients", params={"limit": 20, "sort": "-registeredDate"}
                )
                answered += 1
                if answer.status_code != 200:
                    failures.append(answer.status_code)
                await asyncio.sleep(0.01)
            out, err = rebuild.communicate()
        stop.set()
        thread.join()
        assert rebuild.returncode == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["swapped"] is True
        assert summary["events"] > 300
        assert answered > 10 and failures == []
        assert exists(settings, "directory_patients__old")
        assert not exists(settings, "directory_patients__next")
        # The patients' history is rebuilt, compared and swapped with them: a row per event.
        assert exists(settings, "patient_history__old")
        assert summary["rows"]["patient_history"] == summary["events"]
        await settled(settings, store)
        live = rows(settings)
        assert set(written) <= set(live), "a write made during the rebuild is missing"
        # The swapped-in model is a rebuild: a second one finds it equal again.
        assert carelog(settings, "projections", "drop-old", "directory").returncode == 0
        again = carelog(settings, "projections", "rebuild", "directory", "--yes", "--json")
        assert again.returncode == 0, again.stderr
    finally:
        stop.set()
        projection.stop()
        relay.stop()


async def test_killed_halfway_the_same_command_resumes_and_ends_equal(
    own_settings: Settings, own_store: EventStore, tmp_path: Path
):
    settings, store = own_settings, own_store
    write_some(PatientService(store, claim_key()), 2500, random.Random(9))
    relay = Process(["relay"], settings, "relay", tmp_path / "relay").start()
    projection = Process(["project", "directory"], settings, "projection", tmp_path / "p").start()
    try:
        await settled(settings, store)
        first = start(settings, "projections", "rebuild", "directory", "--yes", "--duty", "0.3")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if exists(settings, "directory_positions__next"):
                with psycopg.connect(settings.database_url) as conn:
                    row = conn.execute("SELECT count(*) FROM directory_positions__next").fetchone()
                if row and row[0] >= 500:
                    break
            await asyncio.sleep(0.02)
        first.kill()  # SIGKILL, halfway
        first.wait()
        assert exists(settings, "directory_patients__next")
        assert not exists(settings, "directory_patients__old"), "swapped a half-built copy"
        listed = carelog(settings, "projections", "list", "--json")
        states = {r["name"]: r["state"] for r in json.loads(listed.stdout)}
        assert states["directory"] == "rebuilding"

        second = carelog(settings, "projections", "rebuild", "directory", "--yes", "--json")
        assert second.returncode == 0, second.stderr
        summary = json.loads(second.stdout.strip().splitlines()[-1])
        assert summary["resumed_from"] > 0 and summary["swapped"] is True
        assert exists(settings, "directory_patients__old")
    finally:
        projection.stop()
        relay.stop()


async def test_a_corrupted_row_is_caught_and_nothing_is_swapped_then_rollback(
    own_settings: Settings, own_store: EventStore, tmp_path: Path
):
    settings, store = own_settings, own_store
    made = write_some(PatientService(store, claim_key()), 50, random.Random(3))
    relay = Process(["relay"], settings, "relay", tmp_path / "relay").start()
    projection = Process(["project", "directory"], settings, "projection", tmp_path / "p").start()
    try:
        await settled(settings, store)
        victim = made[7]
        with psycopg.connect(settings.database_url) as conn:
            conn.execute(
                "UPDATE directory_patients SET address = 'tampered' WHERE id = %s", [victim]
            )
        refused = carelog(settings, "projections", "rebuild", "directory", "--yes")
        assert refused.returncode == 3, refused.stderr
        assert str(victim) in refused.stderr
        assert "tampered" not in refused.stderr
        assert not exists(settings, "directory_patients__old")
        assert rows(settings)[victim][3] == "tampered"
        assert carelog(settings, "projections", "discard", "directory").returncode == 0

        with psycopg.connect(settings.database_url) as conn:
            conn.execute(
                "UPDATE directory_patients SET address = %s WHERE id = %s",
                [store.repository.get(victim).address, victim],
            )
        before = rows(settings)
        done = carelog(settings, "projections", "rebuild", "directory", "--yes")
        assert done.returncode == 0, done.stderr
        assert rows(settings) == before
        back = carelog(settings, "projections", "rollback", "directory")
        assert back.returncode == 0, back.stderr
        assert rows(settings) == before
        assert carelog(settings, "projections", "drop-old", "directory").returncode == 0
        assert not exists(settings, "directory_patients__old")
    finally:
        projection.stop()
        relay.stop()


def test_dry_run_and_no_terminal_without_yes_change_nothing(own_settings: Settings):
    dry = carelog(own_settings, "projections", "rebuild", "appointments", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would start rebuilding appointments" in dry.stderr
    assert not exists(own_settings, "appointments__next")
    refused = carelog(own_settings, "projections", "rebuild", "appointments")
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    unknown = carelog(own_settings, "projections", "rebuild", "nothing", "--yes")
    assert unknown.returncode == 1
    assert "no read model named" in unknown.stderr


def full_rows(settings: Settings) -> dict[UUID, tuple[Any, ...]]:
    with psycopg.connect(settings.database_url) as conn:
        return {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT id, version, position, name, given_name, family_name, email, address,"
                " date_of_birth, registered_date, removed FROM directory_patients"
            )
        }


async def test_a_rebuild_over_v1_and_v2_events_equals_one_over_v2_only(
    own_settings: Settings, own_store: EventStore, tmp_path: Path
):
    from eventsourcing.utils import get_topic

    from domain.patients import Patient

    settings, store = own_settings, own_store
    write_some(PatientService(store, claim_key()), 120, random.Random(21))
    relay = Process(["relay"], settings, "relay", tmp_path / "relay").start()
    projection = Process(["project", "directory"], settings, "projection", tmp_path / "p").start()
    try:
        await settled(settings, store)
        assert carelog(settings, "projections", "rebuild", "directory", "--yes").returncode == 0
        only_v2 = full_rows(settings)
        assert all(row[3] for row in only_v2.values()), "given names are projected"
        assert carelog(settings, "projections", "drop-old", "directory").returncode == 0

        topic = get_topic(Patient.Registered)
        with psycopg.connect(settings.database_url) as conn:
            stored = conn.execute(
                f"SELECT originator_id, originator_version, state FROM {store.events_table}"
                " WHERE topic = %s ORDER BY notification_id",
                [topic],
            ).fetchall()
            for originator, version, state in stored[::2]:  # every other one, back to v1
                old = json.loads(bytes(state))
                for key in ("class_version", "given_name", "family_name"):
                    old.pop(key)
                # Version 1 was stored before sealing began: its fields are in the clear.
                assert store.keyring is not None
                for key in ("name", "email", "address", "date_of_birth"):
                    old[key] = store.keyring.open(old[key], key)
                old["date_of_birth"] = {"_type_": "date_iso", "_data_": old["date_of_birth"]}
                conn.execute(
                    f"UPDATE {store.events_table} SET state = %s"
                    " WHERE originator_id = %s AND originator_version = %s",
                    [json.dumps(old).encode(), originator, version],
                )
            versions = {
                json.loads(bytes(r[0])).get("class_version", 1)
                for r in conn.execute(
                    f"SELECT state FROM {store.events_table} WHERE topic = %s",
                    [topic],
                )
            }
        assert versions == {1, 2}
        mixed = carelog(settings, "projections", "rebuild", "directory", "--yes")
        assert mixed.returncode == 0, mixed.stderr
        assert full_rows(settings) == only_v2
    finally:
        projection.stop()
        relay.stop()


async def test_analytics_rebuild_takes_money_from_billing_and_the_rest_from_the_store(
    own_settings: Settings, own_store: EventStore, tmp_path: Path
):
    from datetime import UTC, datetime

    import msgspec

    from domain import contracts
    from domain.billing import InvoiceIssuedV1, PaymentRecordedV1
    from projections.analytics import AnalyticsProjection
    from runtime.db import open_pool

    settings, store = own_settings, own_store
    write_some(PatientService(store, claim_key()), 60, random.Random(4))
    relay = Process(["relay"], settings, "relay", tmp_path / "relay").start()
    analytics = Process(["project", "analytics"], settings, "analytics", tmp_path / "a").start()
    try:
        movements = []
        with psycopg.connect(settings.database_url) as conn:
            for i in range(12):
                account = uuid.uuid4()
                data: Any = (
                    InvoiceIssuedV1(
                        invoice_id=uuid.uuid4(),
                        patient_id=uuid.uuid4(),
                        currency="GBP",
                        total_minor=1000 + i,
                        line_count=1,
                        balance_minor=1000 + i,
                    )
                    if i % 3
                    else PaymentRecordedV1(
                        payment_id=uuid.uuid4(),
                        patient_id=uuid.uuid4(),
                        currency="EUR",
                        amount_minor=500 + i,
                        balance_minor=0,
                    )
                )
                contract = contracts.BY_PAYLOAD[type(data)]
                at = datetime.now(UTC)
                row = conn.execute(
                    "INSERT INTO billing.outbox (aggregate_id, aggregate_version, type,"
                    " schema_version, payload, occurred_at, published_at)"
                    " VALUES (%s, 2, %s, %s, %s, %s, now()) RETURNING id",
                    [account, contract.type, contract.version, msgspec.json.encode(data), at],
                ).fetchone()
                assert row is not None
                envelope = contracts.envelope(
                    data, aggregate_id=account, aggregate_version=2, position=row[0], occurred_at=at
                )
                movements.append((envelope, data))
        pool = await open_pool(settings.database_url, min_size=1, max_size=1)
        async with pool.connection() as conn:
            await AnalyticsProjection().apply(conn, movements)  # as the billing consumer would
        await pool.close()

        def patients_counted() -> int:
            with psycopg.connect(settings.database_url) as conn:
                row = conn.execute("SELECT count(*) FROM analytics_patients").fetchone()
                return int(row[0]) if row else 0

        deadline = time.monotonic() + 60
        while patients_counted() < 60 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        done = carelog(settings, "projections", "rebuild", "analytics", "--yes", "--json")
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        assert summary["swapped"] is True
        assert summary["rows"]["analytics_money"] == 12
        assert summary["rows"]["analytics_patients"] == 60
        listed = json.loads(carelog(settings, "projections", "list", "--json").stdout)
        assert {r["name"] for r in listed} == {"directory", "appointments", "analytics"}
        assert carelog(settings, "projections", "drop-old", "analytics").returncode == 0
    finally:
        analytics.stop()
        relay.stop()
