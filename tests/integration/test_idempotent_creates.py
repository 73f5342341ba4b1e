"""`Idempotency-Key` on POST /patients and POST /appointments, against the real event store:
a retry answers what the first request did and makes nothing twice."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from litestar.testing import AsyncTestClient

from commands.api import create_app
from commands.store import EventStore
from domain.roles import Role
from runtime.settings import Settings
from tests.support.patients import body
from tests.support.tokens import TestTokens

pytestmark = pytest.mark.integration

REGISTERED = "domain.patients:Patient.Registered"
BOOKED = "domain.scheduling:Appointment.Booked"
ALWAYS = {day: [["00:00", "24:00"]] for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}


@pytest.fixture
async def client(
    settings: Settings, store: EventStore, tokens: TestTokens
) -> AsyncIterator[AsyncTestClient[Any]]:
    app = create_app(settings, store, verifier=tokens.verifier)
    async with AsyncTestClient(app=app) as test_client:
        test_client.headers.update(tokens.headers(Role.ADMIN, subject=str(uuid.uuid4())))
        yield test_client


def mark(settings: Settings) -> int:
    """The store's newest position: what a test counts from."""
    with psycopg.connect(settings.database_url) as db:
        row = db.execute("SELECT coalesce(max(notification_id), 0) FROM carelog_events").fetchone()
    assert row is not None
    return int(row[0])


def created_since(settings: Settings, since: int, topic: str) -> list[uuid.UUID]:
    """The aggregates created (their first event, of `topic`) after position `since`."""
    with psycopg.connect(settings.database_url) as db:
        rows = db.execute(
            "SELECT originator_id FROM carelog_events"
            " WHERE notification_id > %s AND topic = %s AND originator_version = 1",
            [since, topic],
        ).fetchall()
    return [row[0] for row in rows]


def expire(settings: Settings, key: str) -> None:
    """Moves a key's row back past its 24 hours."""
    with psycopg.connect(settings.database_url) as db:
        changed = db.execute(
            "UPDATE idempotency_keys SET created_at = now() - interval '24 hours 1 second'"
            " WHERE key = %s",
            [key],
        ).rowcount
    assert changed == 1


def keyed(key: str) -> dict[str, str]:
    return {"Idempotency-Key": key}


async def test_the_same_key_and_body_answer_the_same_patient_once(client, settings):
    since, key, sent = mark(settings), str(uuid.uuid4()), body()
    first = await client.post("/patients", json=sent, headers=keyed(key))
    again = await client.post("/patients", json=sent, headers=keyed(key))
    assert first.status_code == again.status_code == 201, (first.text, again.text)
    assert again.json() == first.json()
    for name in ("location", "etag", "event-position"):
        assert again.headers[name] == first.headers[name], name
    assert created_since(settings, since, REGISTERED) == [uuid.UUID(first.json()["id"])]


async def test_the_same_key_with_another_body_is_422_and_makes_nothing(client, settings):
    key = str(uuid.uuid4())
    first = await client.post("/patients", json=body(), headers=keyed(key))
    assert first.status_code == 201, first.text
    since = mark(settings)
    other = await client.post("/patients", json=body(), headers=keyed(key))
    assert other.status_code == 422, other.text
    assert other.headers["content-type"].startswith("application/problem+json")
    assert other.json()["status"] == 422
    assert "Idempotency-Key" in other.json()["errors"]
    assert created_since(settings, since, REGISTERED) == []


async def test_concurrent_requests_with_one_key_make_exactly_one_patient(client, settings):
    since, key, sent = mark(settings), str(uuid.uuid4()), body()
    answers = await asyncio.gather(
        *(client.post("/patients", json=sent, headers=keyed(key)) for _ in range(8))
    )
    assert {a.status_code for a in answers} == {201}, [a.text for a in answers]
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1
    assert all(a.json() == answers[0].json() for a in answers)  # position included
    assert created_since(settings, since, REGISTERED) == [uuid.UUID(ids.pop())]


async def test_a_key_older_than_24_hours_is_a_new_key(client, settings):
    key = str(uuid.uuid4())
    first = await client.post("/patients", json=body(), headers=keyed(key))
    assert first.status_code == 201, first.text
    expire(settings, key)
    since = mark(settings)
    # Another body: no 422, since the key no longer stands for the first request.
    later = await client.post("/patients", json=body(), headers=keyed(key))
    assert later.status_code == 201, later.text
    assert later.json()["id"] != first.json()["id"]
    assert created_since(settings, since, REGISTERED) == [uuid.UUID(later.json()["id"])]
    # And the key now stands for the new request.
    again = await client.post("/patients", json=body(), headers=keyed(key))
    assert again.status_code == 422, again.text


async def test_expired_keys_are_deleted(settings, store, tokens, client):
    old = str(uuid.uuid4())
    first = await client.post("/patients", json=body(), headers=keyed(old))
    assert first.status_code == 201, first.text
    expire(settings, old)
    # A process deletes expired keys on its first keyed create, and now and then after.
    app = create_app(settings, store, verifier=tokens.verifier)
    async with AsyncTestClient(app=app) as fresh:
        fresh.headers.update(tokens.headers(Role.ADMIN, subject=str(uuid.uuid4())))
        answer = await fresh.post("/patients", json=body(), headers=keyed(str(uuid.uuid4())))
    assert answer.status_code == 201, answer.text
    with psycopg.connect(settings.database_url) as db:
        left = db.execute("SELECT count(*) FROM idempotency_keys WHERE key = %s", [old]).fetchone()
    assert left == (0,)


async def test_a_key_is_the_callers_own(settings, store, tokens, client):
    key, since = str(uuid.uuid4()), mark(settings)
    mine = await client.post("/patients", json=body(), headers=keyed(key))
    assert mine.status_code == 201, mine.text
    app = create_app(settings, store, verifier=tokens.verifier)
    async with AsyncTestClient(app=app) as other:
        other.headers.update(tokens.headers(Role.ADMIN, subject=str(uuid.uuid4())))
        theirs = await other.post("/patients", json=body(), headers=keyed(key))
    assert theirs.status_code == 201, theirs.text
    assert theirs.json()["id"] != mine.json()["id"]
    assert len(created_since(settings, since, REGISTERED)) == 2


async def test_a_retry_after_the_patient_was_removed_says_it_is_gone(client, settings):
    key, sent = str(uuid.uuid4()), body()
    first = await client.post("/patients", json=sent, headers=keyed(key))
    assert first.status_code == 201, first.text
    removed = await client.delete(f"/patients/{first.json()['id']}")
    assert removed.status_code == 204, removed.text
    since = mark(settings)
    again = await client.post("/patients", json=sent, headers=keyed(key))
    assert again.status_code == 404, again.text
    assert created_since(settings, since, REGISTERED) == []


@pytest.mark.parametrize("key", ["", "  ", "k" * 256, "has space", "tab\tkey", "ключ"])
async def test_an_unusable_key_is_400_naming_the_header(client, settings, key):
    since = mark(settings)
    raw = [("idempotency-key", key.encode("utf-8"))]
    answer = await client.post("/patients", json=body(), headers=raw)
    assert answer.status_code == 400, answer.text
    assert "Idempotency-Key" in answer.json()["errors"]
    assert created_since(settings, since, REGISTERED) == []


async def test_a_key_of_255_printable_characters_is_accepted(client):
    key = "".join(chr(c) for c in range(0x21, 0x7F)) * 3  # 282: every printable one
    answer = await client.post("/patients", json=body(), headers=keyed(key[:255]))
    assert answer.status_code == 201, answer.text


# --- appointments -----------------------------------------------------------------------


async def booking(client: AsyncTestClient[Any], weeks_ahead: int = 3) -> dict[str, Any]:
    """A valid booking body: a new patient with a new clinician who always works."""
    patient = await client.post("/patients", json=body())
    clinician = await client.post(
        "/clinicians",
        json={
            "name": f"Dr {uuid.uuid4().hex[:6]}",
            "email": f"dr-{uuid.uuid4().hex[:8]}@example.org",
            "timezone": "UTC",
            "workingHours": ALWAYS,
        },
    )
    assert patient.status_code == clinician.status_code == 201, (patient.text, clinician.text)
    today = datetime.now(UTC).replace(hour=10, minute=0, second=0, microsecond=0)
    start = today + timedelta(days=(7 - today.weekday()) + 7 * (weeks_ahead - 1))
    return {
        "patientId": patient.json()["id"],
        "clinicianId": clinician.json()["id"],
        "start": start.isoformat().replace("+00:00", "Z"),
        "durationMinutes": 30,
        "reason": "annual check-up",
    }


async def test_the_same_key_and_booking_answer_one_appointment(client, settings):
    sent, key = await booking(client), str(uuid.uuid4())
    since = mark(settings)
    first = await client.post("/appointments", json=sent, headers=keyed(key))
    again = await client.post("/appointments", json=sent, headers=keyed(key))
    assert first.status_code == again.status_code == 201, (first.text, again.text)
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert created_since(settings, since, BOOKED) == [uuid.UUID(first.json()["id"])]
    # Without the key, the same booking is a second request: the slot is taken (409).
    unkeyed = await client.post("/appointments", json=sent)
    assert unkeyed.status_code == 409, unkeyed.text


async def test_the_same_key_with_another_booking_is_422(client, settings):
    sent, key = await booking(client), str(uuid.uuid4())
    first = await client.post("/appointments", json=sent, headers=keyed(key))
    assert first.status_code == 201, first.text
    since = mark(settings)
    moved = {**sent, "durationMinutes": 60}
    other = await client.post("/appointments", json=moved, headers=keyed(key))
    assert other.status_code == 422, other.text
    assert "Idempotency-Key" in other.json()["errors"]
    assert created_since(settings, since, BOOKED) == []


async def test_concurrent_bookings_with_one_key_make_exactly_one_appointment(client, settings):
    sent, key = await booking(client), str(uuid.uuid4())
    since = mark(settings)
    answers = await asyncio.gather(
        *(client.post("/appointments", json=sent, headers=keyed(key)) for _ in range(8))
    )
    assert {a.status_code for a in answers} == {201}, [a.text for a in answers]
    ids = {a.json()["id"] for a in answers}
    assert len(ids) == 1
    assert all(a.json() == answers[0].json() for a in answers)  # position included
    assert created_since(settings, since, BOOKED) == [uuid.UUID(ids.pop())]


async def test_a_booking_key_older_than_24_hours_is_a_new_key(client, settings):
    sent, key = await booking(client), str(uuid.uuid4())
    first = await client.post("/appointments", json=sent, headers=keyed(key))
    assert first.status_code == 201, first.text
    expire(settings, key)
    since = mark(settings)
    later_start = datetime.fromisoformat(sent["start"]) + timedelta(hours=2)
    later = {**sent, "start": later_start.isoformat().replace("+00:00", "Z")}
    second = await client.post("/appointments", json=later, headers=keyed(key))
    assert second.status_code == 201, second.text
    assert second.json()["id"] != first.json()["id"]
    assert created_since(settings, since, BOOKED) == [uuid.UUID(second.json()["id"])]
