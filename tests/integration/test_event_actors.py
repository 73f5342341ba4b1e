"""Every event records who caused it: in the event store, and on the Kafka messages."""

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
from commands.relay import EventStoreLog
from commands.store import CACHE_SIZE, EventStore, fresh
from domain.contracts import PATIENT_STREAM, decode, envelope_for
from domain.roles import Role
from runtime.kafka import ensure_topics, reliable_producer
from runtime.publisher import Publisher
from runtime.settings import Settings
from tests.support.patients import body, published
from tests.support.stack import read_topic
from tests.support.tokens import TestTokens

pytestmark = pytest.mark.integration

ALWAYS = {day: [["00:00", "24:00"]] for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}


@pytest.fixture
async def client(
    settings: Settings, store: EventStore, tokens: TestTokens
) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(app=create_app(settings, store, verifier=tokens.verifier)) as c:
        yield c


def stored(store: EventStore, position: int) -> Any:
    notification = store.recorder.select_notifications(position, 1)[0]
    return store.mapper.to_domain_event(notification)


def as_user(tokens: TestTokens, role: Role) -> tuple[str, dict[str, str]]:
    user = str(uuid.uuid4())
    return user, tokens.headers(role, subject=user)


async def test_patient_events_record_the_user_and_role_of_the_token(client, store, tokens):
    receptionist, as_receptionist = as_user(tokens, Role.RECEPTIONIST)
    clinician, as_clinician = as_user(tokens, Role.CLINICIAN)
    created = await client.post(
        "/patients", json=body(), headers={**as_receptionist, "X-Correlation-ID": "corr-act-1"}
    )
    assert created.status_code == 201, created.text
    changed = await client.put(
        f"/patients/{created.json()['id']}", json=body(name="Ada King"), headers=as_clinician
    )
    assert changed.status_code == 200, changed.text

    registered = stored(store, int(created.headers["event-position"]))
    assert (registered.actor_id, registered.actor_role) == (receptionist, "receptionist")
    assert registered.correlation_id == "corr-act-1"
    change = stored(store, int(changed.headers["event-position"]))
    assert (change.actor_id, change.actor_role) == (clinician, "clinician")


async def test_a_change_decided_in_the_event_loop_records_its_actor(settings, keyring, tokens):
    """The command process caches what it saves: a change of such a patient that keeps
    the email is decided in the event loop, and records the token's user and the
    request's correlation id as one decided in a thread does."""
    caching = EventStore(settings.database_url, cache_size=CACHE_SIZE, keyring=keyring)
    try:
        app = create_app(settings, caching, verifier=tokens.verifier)
        async with AsyncTestClient(app=app) as client:
            clinician, as_clinician = as_user(tokens, Role.CLINICIAN)
            first = body()
            created = await client.post("/patients", json=first, headers=as_clinician)
            assert created.status_code == 201, created.text
            assert caching.knows(uuid.UUID(created.json()["id"]))
            changed = await client.put(
                f"/patients/{created.json()['id']}",
                json=body(name="Ada King", email=first["email"]),
                headers={**as_clinician, "X-Correlation-ID": "corr-act-loop"},
            )
            assert changed.status_code == 200, changed.text
        change = stored(caching, int(changed.headers["event-position"]))
        assert (change.actor_id, change.actor_role) == (clinician, "clinician")
        assert change.correlation_id == "corr-act-loop"
    finally:
        caching.close()


async def test_clinician_and_appointment_events_record_their_actor(client, store, tokens):
    admin, as_admin = as_user(tokens, Role.ADMIN)
    doctor = await client.post(
        "/clinicians",
        json={
            "name": "Dr Actor",
            "email": f"dr-{uuid.uuid4().hex[:8]}@example.org",
            "timezone": "UTC",
            "workingHours": ALWAYS,
        },
        headers=as_admin,
    )
    assert doctor.status_code == 201, doctor.text
    receptionist, as_receptionist = as_user(tokens, Role.RECEPTIONIST)
    patient = await client.post("/patients", json=body(), headers=as_receptionist)
    start = (datetime.now(UTC) + timedelta(days=20)).replace(
        hour=10, minute=0, second=0, microsecond=0
    )
    booked = await client.post(
        "/appointments",
        json={
            "patientId": patient.json()["id"],
            "clinicianId": doctor.json()["id"],
            "start": start.isoformat(),
            "durationMinutes": 30,
            "reason": "check-up",
        },
        headers=as_receptionist,
    )
    assert booked.status_code == 201, booked.text

    clinician_event = stored(store, int(doctor.headers["event-position"]))
    assert (clinician_event.actor_id, clinician_event.actor_role) == (admin, "admin")
    booking = stored(store, int(booked.headers["event-position"]))
    assert (booking.actor_id, booking.actor_role) == (receptionist, "receptionist")


async def test_an_event_stored_before_actors_were_recorded_still_loads(
    client, store, settings: Settings, tokens
):
    created = await client.post("/patients", json=body(), headers=tokens.headers(Role.ADMIN))
    position = int(created.headers["event-position"])
    patient_id = uuid.UUID(created.json()["id"])
    # Rewrite the stored row as the code before this change stored it: no actor fields.
    with psycopg.connect(settings.database_url, autocommit=True) as db:
        rewritten = db.execute(
            f"UPDATE {store.events_table} SET state = convert_to("
            "((convert_from(state, 'UTF8')::jsonb) - 'actor_id' - 'actor_role')::text, 'UTF8')"
            " WHERE notification_id = %s RETURNING convert_from(state, 'UTF8')",
            [position],
        ).fetchone()
    assert rewritten is not None and "actor_id" not in rewritten[0]

    old = stored(store, position)
    assert (old.actor_id, old.actor_role) == (None, None)
    envelope = envelope_for(old, position)
    assert envelope is not None and (envelope.actor_id, envelope.actor_role) == (None, None)
    with fresh():
        assert store.load(patient_id).version == 1


async def test_the_actor_travels_in_the_envelope_and_the_headers(
    client, store, settings: Settings, tokens
):
    user, headers = as_user(tokens, Role.CLINICIAN)
    created = await client.post("/patients", json=body(), headers=headers)
    assert created.status_code == 201, created.text
    position = int(created.headers["event-position"])
    patient_events = [e for e, _ in published(store, 1, position) if e.type.startswith("Patient")]

    kafka = reliable_producer(settings)
    await kafka.start()
    source = EventStoreLog(store, settings.database_url, topic_prefix=settings.topic_prefix)
    await ensure_topics(settings, source.topics)
    relay = Publisher(source, kafka)
    relaying = asyncio.create_task(relay.run())
    key = created.json()["id"].encode()
    try:
        records = await read_topic(
            settings,
            settings.topic(PATIENT_STREAM),
            len(patient_events),
            until=lambda records: any(r.key == key for r in records),
        )
    finally:
        relay.stop()
        await relaying
        await kafka.stop()
    mine = [r for r in records if r.key == key]
    assert len(mine) == 1
    envelope, _ = decode(mine[0].value)
    assert (envelope.actor_id, envelope.actor_role) == (user, "clinician")
    kafka_headers = dict(mine[0].headers)
    assert kafka_headers["actor-id"] == user.encode()
    assert kafka_headers["actor-role"] == b"clinician"
