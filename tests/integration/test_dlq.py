"""`carelog dlq`: a poison event is set aside, listed without personal data, and replayed
once its cause is fixed; replaying twice changes nothing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import msgspec
import psycopg

from domain import contracts
from runtime.kafka import ensure_topics, reliable_producer
from runtime.settings import Settings
from tests.support.stack import ROOT, Process, claim_key, env_for


def carelog(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bootstrap", *args],
        env=env_for(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def publish(
    settings: Settings, data: msgspec.Struct, patient: uuid.UUID, version: int
) -> None:
    topic = settings.topic(contracts.PATIENT_STREAM)
    await ensure_topics(settings, [topic])
    producer = reliable_producer(settings)
    await producer.start()
    try:
        envelope = contracts.envelope(
            data,
            aggregate_id=patient,
            aggregate_version=version,
            position=10**9 + version,
            occurred_at=datetime.now(UTC),
        )
        await producer.send_and_wait(
            topic, msgspec.json.encode(envelope), key=str(patient).encode()
        )
    finally:
        await producer.stop()


def name_of(settings: Settings, patient: uuid.UUID) -> str | None:
    with psycopg.connect(settings.database_url) as conn:
        row = conn.execute(
            "SELECT name FROM directory_patients WHERE id = %s", [patient]
        ).fetchone()
        return row[0] if row else None


async def until(check, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := await asyncio.to_thread(check):
            return value
        await asyncio.sleep(0.2)
    raise AssertionError("condition not met")


async def test_a_poison_event_is_listed_shown_redacted_and_replayed_after_the_fix(
    own_settings: Settings, tmp_path: Path
):
    settings = own_settings
    patient = uuid.uuid4()
    projection = Process(["project", "directory"], settings, "projection", tmp_path / "p").start()
    try:
        changed = contracts.PatientDetailsChangedV1(
            name="Secret Name",
            email="secret@example.org",
            address="1 Hidden Rd",
            date_of_birth=date(1980, 1, 1),
        )
        await publish(settings, changed, patient, 2)  # a change for a patient never registered

        def listed() -> list[dict[str, object]]:
            out = carelog(settings, "dlq", "list").stdout
            return [json.loads(line) for line in out.splitlines() if line.strip()]

        (letter,) = await until(listed)
        assert letter["type"] == "PatientDetailsChanged v1"
        assert letter["aggregateId"] == str(patient)
        assert "Secret" not in json.dumps(letter)

        shown = carelog(settings, "dlq", "show", str(letter["id"]))
        assert shown.returncode == 0, shown.stderr
        assert "Secret" not in shown.stdout and "redacted" in shown.stdout
        revealed = carelog(settings, "dlq", "show", str(letter["id"]), "--reveal")
        assert "Secret Name" in revealed.stdout
        assert "personal data revealed" in revealed.stdout + revealed.stderr
        with psycopg.connect(settings.database_url) as conn:
            disclosed = conn.execute("SELECT operation, patient_ids FROM audit.records")
            assert disclosed.fetchall() == [("cli.dlq.reveal", [patient])]

        early = carelog(settings, "dlq", "replay", str(letter["id"]))
        assert early.returncode == 1
        assert "still unappliable" in early.stdout

        registered = contracts.PatientRegisteredV1(
            name="First Name",
            email="first@example.org",
            address="1 Known Rd",
            date_of_birth=date(1980, 1, 1),
            registered_date=date(2024, 1, 1),
        )
        await publish(settings, registered, patient, 1)  # the cause, fixed
        await until(lambda: name_of(settings, patient) == "First Name")

        fixed = carelog(settings, "dlq", "replay", str(letter["id"]))
        assert fixed.returncode == 0, fixed.stderr
        assert f"{letter['id']}: applied" in fixed.stdout
        assert name_of(settings, patient) == "Secret Name"
        again = carelog(settings, "dlq", "replay", "--all")
        assert "already applied: no change" in again.stdout
        assert name_of(settings, patient) == "Secret Name"
    finally:
        projection.stop()


def test_history_prints_events_in_order_redacted_unless_revealed(own_settings, own_store):
    from commands.service import PatientService
    from tests.support.patients import details

    service = PatientService(own_store, claim_key())
    written = service.register(details("Hidden Person"), date(2024, 1, 2), "corr-h1")
    service.change(written.patient_id, details("Hidden Person Two"), correlation_id="corr-h2")
    shown = carelog(own_settings, "history", "patient", str(written.patient_id))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["v1", "v2"]
    assert "Patient.Registered" in lines[0] and "corr=corr-h1" in lines[0]
    assert "Patient.DetailsChanged" in lines[1] and "corr=corr-h2" in lines[1]
    assert "Hidden" not in shown.stdout and "<redacted>" in shown.stdout
    revealed = carelog(own_settings, "history", "patient", str(written.patient_id), "--reveal")
    assert "Hidden Person Two" in revealed.stdout
    assert "personal data revealed" in revealed.stdout + revealed.stderr
    missing = carelog(own_settings, "history", "patient", str(uuid.uuid4()))
    assert missing.returncode == 1
