"""A patient's history through the query API: who changed which fields, when; values by role.

Written through the real command API (so each event carries its token's actor),
projected by the real directory projection into the real read model, read back with
tokens of each role.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest
from litestar.testing import AsyncTestClient

from commands.api import create_app as commands_app
from commands.store import EventStore
from domain.roles import Role
from projections.directory import DirectoryProjection
from read_api.app import create_app as read_app
from runtime.db import open_pool
from runtime.settings import Settings
from tests.support.audit import shipped
from tests.support.patients import body, published
from tests.support.tokens import TestTokens

pytestmark = pytest.mark.integration


@pytest.fixture
async def writes(settings: Settings, store: EventStore, tokens: TestTokens) -> AsyncIterator[Any]:
    async with AsyncTestClient(app=commands_app(settings, store, verifier=tokens.verifier)) as c:
        yield c


@pytest.fixture
async def reads(settings: Settings, tokens: TestTokens) -> AsyncIterator[Any]:
    async with AsyncTestClient(app=read_app(settings, verifier=tokens.verifier)) as c:
        yield c


async def project(settings: Settings, store: EventStore, start: int) -> int:
    """Applies the patient events stored from `start`; returns how many were duplicates."""
    batch = [(e, d) for e, d in published(store, start) if e.aggregate_type == "Patient"]
    pool = await open_pool(settings.database_url, min_size=1, max_size=1)
    try:
        async with pool.connection() as conn:
            return (await DirectoryProjection().apply(conn, batch)).duplicates
    finally:
        await pool.close()


def user(tokens: TestTokens, role: Role) -> tuple[str, dict[str, str]]:
    subject = str(uuid.uuid4())
    return subject, tokens.headers(role, subject=subject)


@pytest.fixture
async def story(writes, settings, store, tokens) -> dict[str, Any]:
    """A patient registered, changed, opted out of reminders and removed, by three users."""
    start = (store.recorder.max_notification_id() or 0) + 1
    receptionist, as_receptionist = user(tokens, Role.RECEPTIONIST)
    clinician, as_clinician = user(tokens, Role.CLINICIAN)
    admin, as_admin = user(tokens, Role.ADMIN)
    first = body(name="Old Name Marker", address="1 Old Address Marker")
    created = await writes.post("/patients", json=first, headers=as_receptionist)
    assert created.status_code == 201, created.text
    patient = created.json()["id"]
    second = first | {"name": "New Name Marker", "address": "2 New Address Marker"}
    changed = await writes.put(
        f"/patients/{patient}",
        json=second,
        headers={**as_clinician, "X-Correlation-ID": "history-change-1"},
    )
    assert changed.status_code == 200, changed.text
    prefs = await writes.put(
        f"/patients/{patient}/preferences", json={"reminders": False}, headers=as_admin
    )
    assert prefs.status_code == 200, prefs.text
    removed = await writes.delete(f"/patients/{patient}", headers=as_admin)
    assert removed.status_code == 204, removed.text
    await project(settings, store, start)
    return {
        "patient": patient,
        "start": start,
        "first": first,
        "actors": [
            (receptionist, "receptionist"),
            (clinician, "clinician"),
            (admin, "admin"),
            (admin, "admin"),
        ],
    }


async def test_admins_see_who_changed_which_fields_when_and_the_new_values(reads, story, tokens):
    answer = await reads.get(
        f"/patients/{story['patient']}/history", headers=tokens.headers(Role.ADMIN)
    )
    assert answer.status_code == 200, answer.text
    page = answer.json()
    assert page["patientId"] == story["patient"] and page["next"] is None
    entries = page["entries"]
    assert [e["type"] for e in entries] == [
        "PatientRegistered",
        "PatientDetailsChanged",
        "PatientPreferencesChanged",
        "PatientRemoved",
    ]
    assert [e["version"] for e in entries] == [1, 2, 3, 4]
    assert [(e["actor"]["userId"], e["actor"]["role"]) for e in entries] == story["actors"]
    assert all(e["occurredAt"] and e["position"] >= story["start"] for e in entries)
    assert entries[1]["correlationId"] == "history-change-1"
    assert [e["fields"] for e in entries] == [
        ["name", "email", "address", "dateOfBirth", "registeredDate"],
        ["name", "address"],  # the email and date of birth were sent unchanged
        ["reminders"],
        [],
    ]
    assert entries[0]["values"]["name"] == "Old Name Marker"
    assert entries[0]["values"]["email"] == story["first"]["email"]
    assert entries[1]["values"] == {"name": "New Name Marker", "address": "2 New Address Marker"}
    assert entries[2]["values"] == {"reminders": False}
    assert entries[3]["values"] is None
    # The change shows no old value: the old name appears only where it was set.
    assert "Old Name Marker" not in str(entries[1:])


async def test_clinicians_see_field_names_only_and_receptionists_nothing(reads, story, tokens):
    path = f"/patients/{story['patient']}/history"
    answer = await reads.get(path, headers=tokens.headers(Role.CLINICIAN))
    assert answer.status_code == 200, answer.text
    entries = answer.json()["entries"]
    assert [e["fields"] for e in entries][:2] == [
        ["name", "email", "address", "dateOfBirth", "registeredDate"],
        ["name", "address"],
    ]
    assert all(e["values"] is None for e in entries)
    for marker in ("Name Marker", "Address Marker", story["first"]["email"]):
        assert marker not in answer.text
    for role in (Role.RECEPTIONIST, Role.BILLING, Role.ANALYST):
        refused = await reads.get(path, headers=tokens.headers(role))
        assert refused.status_code == 403, role
    assert (await reads.get(path)).status_code == 401


async def test_each_page_shown_is_recorded_in_the_disclosure_audit(reads, story, settings, tokens):
    correlation = f"history-{uuid.uuid4()}"
    headers = {**tokens.headers(Role.CLINICIAN), "X-Correlation-ID": correlation}
    answer = await reads.get(f"/patients/{story['patient']}/history", headers=headers)
    assert answer.status_code == 200, answer.text
    shipped(settings)
    with psycopg.connect(settings.database_url) as conn:
        records = conn.execute(
            "SELECT role, operation, patient_ids FROM audit.records WHERE correlation_id = %s",
            [correlation],
        ).fetchall()
    assert records == [("clinician", "patient.history", [uuid.UUID(story["patient"])])]


async def test_unknown_patients_are_404_and_bad_cursors_400(reads, tokens):
    admin = tokens.headers(Role.ADMIN)
    for patient in (uuid.uuid4(), "not-an-id"):
        answer = await reads.get(f"/patients/{patient}/history", headers=admin)
        assert answer.status_code == 404
        assert answer.headers["content-type"].startswith("application/problem+json")
    bad = await reads.get(
        f"/patients/{uuid.uuid4()}/history", params={"cursor": "x"}, headers=admin
    )
    assert bad.status_code == 400 and "cursor" in bad.json()["errors"]


async def test_a_long_history_is_paged_by_cursor(reads, story, tokens):
    path = f"/patients/{story['patient']}/history"
    admin = tokens.headers(Role.ADMIN)
    seen, cursor = [], None
    while True:
        params = {"limit": 3} | ({"cursor": cursor} if cursor else {})
        page = (await reads.get(path, params=params, headers=admin)).json()
        seen.extend(e["version"] for e in page["entries"])
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == [1, 2, 3, 4]


async def test_projecting_the_events_again_writes_no_second_entry(
    reads, story, settings, store, tokens
):
    assert await project(settings, store, story["start"]) == 4
    answer = await reads.get(
        f"/patients/{story['patient']}/history", headers=tokens.headers(Role.ADMIN)
    )
    assert [e["version"] for e in answer.json()["entries"]] == [1, 2, 3, 4]
