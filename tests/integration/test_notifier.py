"""The notifier on real Kafka, PostgreSQL and an SMTP server writing a Maildir: exactly the
expected messages, none twice after a kill -9 or a replay, and retry then give-up when
the server refuses."""

from __future__ import annotations

import asyncio
import mailbox
import subprocess
import sys
import time
from datetime import UTC, date, datetime, timedelta
from email import message_from_bytes, policy
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import msgspec
import psycopg
import pytest
from aiosmtpd.controller import Controller

from commands.scheduling import SchedulingService
from commands.service import PatientService
from commands.store import EventStore
from domain import contracts
from domain.scheduling import Booking, Timing, parse_clinician
from notifications.config import NotifierConfig
from notifications.intake import WELCOME, NotificationIntake, plan
from notifications.sender import Sender
from runtime.db import open_pool
from runtime.settings import Settings
from tests.support.patients import details, published
from tests.support.stack import ROOT, Process, claim_key, free_port

ALWAYS = {d: [["00:00", "24:00"]] for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}


def mails(maildir: Path) -> list[Any]:
    box = mailbox.Maildir(maildir, create=False)
    return [message_from_bytes(box.get_bytes(key)) for key in list(box.iterkeys())]


def ledger(settings: Settings) -> list[tuple[str, str, str | None]]:
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute(
            "SELECT purpose, status, last_error FROM notifications ORDER BY created_at"
        ).fetchall()


async def until(check, timeout: float = 90.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := await asyncio.to_thread(check):
            return value
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met")


def text_of(message: Any) -> str:
    return "".join(
        part.get_payload(decode=True).decode()
        for part in message.walk()
        if part.get_content_maintype() == "text"
    )


async def test_exactly_the_expected_messages_even_after_kill_9_and_a_replay(
    own_settings: Settings, own_store: EventStore, tmp_path: Path
):
    settings, store = own_settings, own_store
    maildir = tmp_path / "mail"
    smtp, health = free_port(), free_port()
    catcher = subprocess.Popen(  # noqa: ASYNC220 (started once; the test waits on it below)
        [
            sys.executable,
            "-m",
            "ops.local.mailcatcher",
            str(maildir),
            "--smtp-port",
            str(smtp),
            "--health-port",
            str(health),
        ],
        cwd=ROOT,
    )
    smtp_env = {"CARELOG_SMTP_PORT": str(smtp), "CARELOG_PRACTICE_NAME": "Test Practice"}
    processes = [
        Process(["relay"], settings, "relay", tmp_path / "relay"),
        Process(["project", "directory"], settings, "projection", tmp_path / "directory"),
        Process(["project", "appointments"], settings, "appointments", tmp_path / "appts"),
    ]
    notifier = Process(["notify"], settings, "notifier", tmp_path / "notifier", env=smtp_env)
    try:
        for process in processes:
            process.start()
        patients = PatientService(store, claim_key())
        made = [patients.register(details(), date(2024, 1, 2)).patient_id for _ in range(40)]
        notifier.start()
        await until(lambda: len(list(maildir.glob("new/*"))) >= 3)
        notifier.kill()  # SIGKILL while it is sending
        notifier.start()

        def settled() -> bool:
            rows = ledger(settings)
            return len(rows) == 40 and all(s in ("sent", "given-up") for _, s, _ in rows)

        await until(settled)
        with psycopg.connect(settings.database_url) as conn:
            final = conn.execute("SELECT id, status, last_error FROM notifications").fetchall()
        sent = mails(maildir)
        ids = [m["Message-ID"] for m in sent]
        assert len(ids) == len(set(ids)), "a message was sent twice"
        delivered = {f"<{i}@carelog>" for i, status, _ in final if status == "sent"}
        in_doubt = {f"<{i}@carelog>" for i, status, _ in final if status == "given-up"}
        assert all(
            "in doubt" in (error or "") for _, status, error in final if status == "given-up"
        )
        assert delivered <= set(ids), "recorded as sent but never delivered"
        # In doubt: killed between the server's acceptance and the record. Such a message
        # may have arrived; either way it is not sent again, and it is visible, not lost.
        assert set(ids) <= delivered | in_doubt
        assert len(delivered) + len(in_doubt) == 40
        assert len(in_doubt) <= 20  # at most the batch in flight
        assert {m["X-Carelog-Purpose"] for m in sent} == {WELCOME}

        # One patient books, is moved, then cancelled: three more messages, to them only.
        scheduling = SchedulingService(store)
        clinician = scheduling.register_clinician(
            parse_clinician(
                name="Dr Mail", email="dr@example.org", timezone="UTC", working_hours=ALWAYS
            )
        ).id
        start = (datetime.now(UTC) + timedelta(days=5)).replace(minute=0, second=0, microsecond=0)
        booked = scheduling.book(
            Booking(made[0], clinician, Timing(start, 30), "sensitive symptom")
        ).id
        scheduling.reschedule(booked, Timing(start + timedelta(hours=2), 30))
        scheduling.cancel(booked, "patient asked")
        before = len(sent)
        await until(lambda: len(mails(maildir)) == before + 3)
        latest = [m for m in mails(maildir) if m["X-Carelog-Purpose"] != WELCOME]
        assert sorted(m["X-Carelog-Purpose"] for m in latest) == [
            "booking-confirmation",
            "cancellation-notice",
            "reschedule-notice",
        ]
        address = store.repository.get(made[0]).email
        assert {m["To"] for m in latest} == {address}
        assert all("sensitive" not in text_of(m) for m in latest)
        assert all("Dr Mail" in text_of(m) for m in latest)

        # Redelivering every event owes nothing new and sends nothing new.
        pool = await open_pool(settings.database_url, min_size=1, max_size=1)
        async with pool.connection() as conn:
            await NotificationIntake().apply(conn, published(store))
        await pool.close()
        await asyncio.sleep(1.5)
        assert len(mails(maildir)) == before + 3
        assert len(ledger(settings)) == 43
    finally:
        notifier.stop()
        for process in processes:
            process.stop()
        catcher.terminate()
        catcher.wait(10)


class Refusing:
    """An SMTP handler that answers 451 to the first recipient, then 550."""

    def __init__(self) -> None:
        self.calls = 0

    async def handle_RCPT(self, server, session, envelope, address, options):
        self.calls += 1
        return "451 4.3.0 try again later" if self.calls == 1 else "550 5.1.1 no such mailbox"


async def _directory_row(conn: Any, patient: UUID, name: str, email: str) -> None:
    """The directory's row for a patient the sender will write to."""
    await conn.execute(
        "INSERT INTO directory_patients (id, version, position, name, name_key, email,"
        " email_key, address, date_of_birth, registered_date)"
        " VALUES (%s, 1, 1, %s, %s, %s, %s, 'x', '1990-01-01', '2024-01-01')",
        [patient, name, name.lower(), email, email],
    )


async def test_a_refusing_server_gives_retry_then_given_up(own_settings: Settings):
    settings = own_settings
    port = free_port()
    handler = Refusing()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    patient = uuid4()
    pool = await open_pool(settings.database_url, min_size=1, max_size=2)
    try:
        async with pool.connection() as conn:
            await _directory_row(conn, patient, "Ann Refused", "ann@example.org")
            async with conn.cursor() as cur:
                await plan(cur, f"event:{uuid4()}", WELCOME, patient, None)
            await conn.commit()
        config = NotifierConfig(smtp_port=port, first_retry_seconds=0.05, max_retry_seconds=0.1)
        sender = Sender(pool, config, "UTC")
        assert await sender.send_due() == 1
        assert ledger(settings)[-1][1] == "failed-retrying"
        assert "temporary" in (ledger(settings)[-1][2] or "")
        await asyncio.sleep(0.3)
        assert await sender.send_due() == 1
        _, status, error = ledger(settings)[-1]
        assert status == "given-up"
        assert "550" in (error or "")
        assert handler.calls == 2
        await asyncio.sleep(0.3)
        assert await sender.send_due() == 0  # given up: never tried again
    finally:
        await pool.close()
        controller.stop()


class Keeping:
    """An SMTP handler that keeps what it is given."""

    def __init__(self) -> None:
        self.received: list[tuple[str, list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):
        self.received.append((envelope.mail_from, envelope.rcpt_tos, envelope.original_content))
        return "250 OK"


async def test_a_message_reads_back_as_written_names_beyond_ascii_too(own_settings: Settings):
    port = free_port()
    handler = Keeping()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    patient, name, practice = uuid4(), "Zoë Ångström-Nguyễn", "Clínica Sør-Øst"
    address = f"zoe-{patient.hex[:8]}@example.org"
    pool = await open_pool(own_settings.database_url, min_size=1, max_size=2)
    try:
        async with pool.connection() as conn:
            await _directory_row(conn, patient, name, address)
            async with conn.cursor() as cur:
                await plan(cur, f"event:{uuid4()}", WELCOME, patient, None)
            await conn.commit()
        config = NotifierConfig(smtp_port=port, practice_name=practice)
        assert await Sender(pool, config, "UTC").send_due() == 1
        assert ledger(own_settings)[-1][1] == "sent"
        [(mail_from, recipients, raw)] = handler.received
        assert (mail_from, recipients) == ("no-reply@carelog.invalid", [address])
        message = message_from_bytes(raw, policy=policy.default)
        assert message["Subject"] == f"Welcome to {practice}"
        assert message["To"] == address
        assert message["X-Carelog-Purpose"] == WELCOME
        assert message["Message-ID"].endswith("@carelog>")
        parts = {p.get_content_type(): p.get_content() for p in message.iter_parts()}
        assert set(parts) == {"text/plain", "text/html"}
        assert f"Dear {name}," in parts["text/plain"] and practice in parts["text/plain"]
        assert f"Dear {name}," in parts["text/html"] and practice in parts["text/html"]
    finally:
        await pool.close()
        controller.stop()


async def test_a_batch_that_stops_short_still_records_what_went_out(own_settings: Settings):
    port = free_port()
    handler = Keeping()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    patient = uuid4()
    pool = await open_pool(own_settings.database_url, min_size=1, max_size=2)
    try:
        async with pool.connection() as conn:
            await _directory_row(conn, patient, "Ann Short", "ann@example.org")
            async with conn.cursor() as cur:
                await plan(cur, f"event:{uuid4()}", WELCOME, patient, None)
                # Second in the batch, and broken: nothing the sender knows how to handle.
                await plan(
                    cur,
                    f"event:{uuid4()}",
                    "booking-confirmation",
                    patient,
                    {"appointmentId": "not an id"},
                )
                await cur.execute(
                    "UPDATE notifications SET next_attempt_at = now() - interval '1 minute'"
                    " WHERE purpose = %s",
                    [WELCOME],
                )
            await conn.commit()
        sender = Sender(pool, NotifierConfig(smtp_port=port), "UTC")
        with pytest.raises(ValueError, match="badly formed"):
            await sender.send_due()
        assert len(handler.received) == 1
        assert sorted(r[:2] for r in ledger(own_settings)) == [
            ("booking-confirmation", "sending"),  # in doubt: given up by the next leader
            (WELCOME, "sent"),
        ]
    finally:
        await pool.close()
        controller.stop()


async def test_a_batch_owes_each_message_once_even_with_an_event_twice_in_it(
    own_settings: Settings,
):
    def registered(patient: UUID) -> tuple[contracts.Envelope[Any], Any]:
        data = contracts.PatientRegisteredV2(
            name="Ann Twice",
            given_name="Ann",
            family_name="Twice",
            email="ann@example.org",
            address="1 Road",
            date_of_birth=date(1990, 1, 1),
            registered_date=date(2024, 1, 1),
        )
        return contracts.envelope(
            data,
            aggregate_id=patient,
            aggregate_version=1,
            position=1,
            occurred_at=datetime.now(UTC),
        ), data

    first, second, late = registered(uuid4()), registered(uuid4()), registered(uuid4())
    late = (msgspec.structs.replace(late[0], occurred_at=datetime(2020, 1, 1, tzinfo=UTC)), late[1])
    pool = await open_pool(own_settings.database_url, min_size=1, max_size=1)
    try:
        async with pool.connection() as conn:
            assert await NotificationIntake().apply(conn, [first, second, first, late]) == 3
            assert await NotificationIntake().apply(conn, [second]) == 1
    finally:
        await pool.close()
    assert [r[:2] for r in ledger(own_settings)] == [(WELCOME, "pending")] * 2


async def test_the_ledger_is_listed_to_admins_without_addresses(own_settings: Settings, tokens):
    from litestar.testing import AsyncTestClient

    from domain.roles import Role
    from read_api.app import create_app

    patient = uuid4()
    pool = await open_pool(own_settings.database_url, min_size=1, max_size=1)
    async with pool.connection() as conn, conn.cursor() as cur:
        for i in range(3):
            await plan(cur, f"event:{uuid4()}", WELCOME if i else "reminder", patient, None)
    await pool.close()
    async with AsyncTestClient(app=create_app(own_settings, verifier=tokens.verifier)) as client:
        admin = tokens.headers(Role.ADMIN)
        page = await client.get(
            "/notifications", params={"patientId": str(patient), "limit": 2}, headers=admin
        )
        assert page.status_code == 200, page.text
        first = page.json()
        assert len(first["notifications"]) == 2 and first["next"]
        rest = await client.get(
            "/notifications",
            params={"patientId": str(patient), "limit": 2, "cursor": first["next"]},
            headers=admin,
        )
        listed = first["notifications"] + rest.json()["notifications"]
        assert len({n["id"] for n in listed}) == 3
        assert {n["status"] for n in listed} == {"pending"}
        assert all("@" not in str(n) for n in listed)
        only = await client.get(
            "/notifications", params={"patientId": str(patient), "status": "sent"}, headers=admin
        )
        assert only.json()["notifications"] == []
        bad = await client.get("/notifications", params={"status": "lost"}, headers=admin)
        assert bad.status_code == 400 and set(bad.json()["errors"]) == {"status"}
        refused = await client.get("/notifications", headers=tokens.headers(Role.ANALYST))
        assert refused.status_code == 403


async def test_reminders_respect_opt_outs_and_are_replanned_when_moved(own_settings: Settings):
    from notifications.sender import plan_reminders

    keen, opted_out, clinician = uuid4(), uuid4(), uuid4()
    soon = datetime.now(UTC) + timedelta(hours=5)
    rows = {uuid4(): keen, uuid4(): opted_out}
    async with await psycopg.AsyncConnection.connect(own_settings.database_url) as conn:
        for appointment, patient in rows.items():
            await conn.execute(
                "INSERT INTO appointments (id, version, position, patient_id, clinician_id,"
                " start_at, end_at, duration_minutes, reason, status, booked_at)"
                " VALUES (%s, 1, 1, %s, %s, %s, %s, 30, 'r', 'booked', now())",
                [appointment, patient, clinician, soon, soon + timedelta(minutes=30)],
            )
        await conn.execute(
            "INSERT INTO notification_preferences (patient_id, reminders, version)"
            " VALUES (%s, false, 2)",
            [opted_out],
        )
        await conn.commit()
    pool = await open_pool(own_settings.database_url, min_size=1, max_size=1)
    try:
        await plan_reminders(pool, 24)
        await plan_reminders(pool, 24)  # planning twice owes nothing new
        reminders = [r for r in ledger(own_settings) if r[0] == "reminder"]
        assert [r[1] for r in reminders] == ["pending"]
        moved = next(a for a, p in rows.items() if p == keen)
        async with await psycopg.AsyncConnection.connect(own_settings.database_url) as conn:
            await conn.execute(
                "UPDATE appointments SET start_at = start_at + interval '1 hour' WHERE id = %s",
                [moved],
            )
            await conn.commit()
        await plan_reminders(pool, 24)
        reminders = [r for r in ledger(own_settings) if r[0] == "reminder"]
        assert sorted(r[1] for r in reminders) == ["given-up", "pending"]
        assert any("no longer due" in (r[2] or "") for r in reminders)
    finally:
        await pool.close()
