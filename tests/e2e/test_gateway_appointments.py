"""The booking walk-through of the README, through the gateway on the running stack."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from domain.roles import Role
from tests.e2e.conftest import new_user
from tests.support.patients import body
from tests.support.stack import eventually

pytestmark = pytest.mark.e2e

WEEKDAYS = {day: [["08:00", "18:00"]] for day in ("mon", "tue", "wed", "thu", "fri")}


def next_weekday(days_ahead: int = 7) -> datetime:
    day = datetime.now(UTC) + timedelta(days=days_ahead)
    while day.weekday() >= 5:
        day += timedelta(days=1)
    return day.replace(hour=10, minute=0, second=0, microsecond=0)


async def test_book_see_slots_check_in_complete_and_cancel_through_the_gateway(gateway, admin):
    receptionist = await new_user(gateway, admin, Role.RECEPTIONIST)
    doctor_user = await new_user(gateway, admin, Role.CLINICIAN)
    analyst = await new_user(gateway, admin, Role.ANALYST)

    created = await gateway.post(
        "/api/clinicians",
        json={
            "name": "Dr Grace Lee",
            "email": f"lee-{uuid.uuid4().hex[:8]}@example.org",
            "timezone": "UTC",
            "workingHours": WEEKDAYS,
        },
        headers=admin.headers,
    )
    assert created.status_code == 201, created.text
    clinician = created.json()["id"]
    assert created.headers["location"] == f"/api/clinicians/{clinician}"
    linked = await gateway.put(
        f"/api/clinicians/{clinician}/user", json={"userId": doctor_user.id}, headers=admin.headers
    )
    assert linked.status_code == 200, linked.text

    patient = await gateway.post("/api/patients", json=body(), headers=receptionist.headers)
    start = next_weekday()
    booked = await gateway.post(
        "/api/appointments",
        json={
            "patientId": patient.json()["id"],
            "clinicianId": clinician,
            "start": start.isoformat(),
            "durationMinutes": 30,
            "reason": "blood test",
        },
        headers=receptionist.headers,
    )
    assert booked.status_code == 201, booked.text
    appointment = booked.json()
    assert booked.headers["location"] == f"/api/appointments/{appointment['id']}"
    position = booked.headers["event-position"]

    seen = await gateway.get(
        booked.headers["location"],
        params={"minPosition": position},
        headers=receptionist.headers,
    )
    assert seen.status_code == 200, seen.text
    assert seen.json()["status"] == "booked"
    assert seen.json()["reason"] == "blood test"
    withheld = await gateway.get(booked.headers["location"], headers=analyst.headers)
    assert withheld.json()["reason"] is None

    slots = await gateway.get(
        f"/api/clinicians/{clinician}/slots",
        params={"date": start.date().isoformat(), "durationMinutes": 30},
        headers=receptionist.headers,
    )
    assert slots.status_code == 200, slots.text
    starts = {datetime.fromisoformat(s["start"]) for s in slots.json()["slots"]}
    assert start not in starts
    assert start + timedelta(minutes=30) in starts

    mine = await gateway.get(
        "/api/appointments", params={"clinicianId": "me"}, headers=doctor_user.headers
    )
    assert [a["id"] for a in mine.json()["appointments"]] == [appointment["id"]]

    clash = await gateway.post(
        "/api/appointments",
        json={
            "patientId": (
                await gateway.post("/api/patients", json=body(), headers=admin.headers)
            ).json()["id"],
            "clinicianId": clinician,
            "start": (start + timedelta(minutes=15)).isoformat(),
            "durationMinutes": 30,
            "reason": "x-ray",
        },
        headers=receptionist.headers,
    )
    assert clash.status_code == 409
    assert clash.json()["reason"] == "clinician-busy"

    path = f"/api/appointments/{appointment['id']}"
    assert (await gateway.post(f"{path}/check-in", headers=receptionist.headers)).status_code == 403
    checked = await gateway.post(f"{path}/check-in", headers=doctor_user.headers)
    assert checked.status_code == 200, checked.text
    done = await gateway.post(f"{path}/complete", headers=doctor_user.headers)
    assert done.json()["status"] == "completed"

    async def completed() -> bool:
        answer = await gateway.get(path, headers=admin.headers)
        return answer.json()["status"] == "completed"

    await eventually(completed)


async def test_removing_a_patient_cancels_their_appointments_on_the_stack(gateway, admin):
    receptionist = await new_user(gateway, admin, Role.RECEPTIONIST)
    clinician = (
        await gateway.post(
            "/api/clinicians",
            json={
                "name": "Dr Park",
                "email": f"park-{uuid.uuid4().hex[:8]}@example.org",
                "timezone": "Europe/London",
                "workingHours": {
                    d: [["00:00", "24:00"]]
                    for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
                },
            },
            headers=admin.headers,
        )
    ).json()["id"]
    patient = (
        await gateway.post("/api/patients", json=body(), headers=receptionist.headers)
    ).json()
    start = next_weekday(3)
    booked = await gateway.post(
        "/api/appointments",
        json={
            "patientId": patient["id"],
            "clinicianId": clinician,
            "start": start.isoformat(),
            "durationMinutes": 45,
            "reason": "physio",
        },
        headers=receptionist.headers,
    )
    assert booked.status_code == 201, booked.text
    await gateway.get(
        booked.headers["location"],
        params={"minPosition": booked.headers["event-position"]},
        headers=receptionist.headers,
    )
    removed = await gateway.delete(f"/api/patients/{patient['id']}", headers=receptionist.headers)
    assert removed.status_code == 204

    async def cancelled() -> bool:
        answer = await gateway.get(booked.headers["location"], headers=admin.headers)
        return (
            answer.json()["status"] == "cancelled"
            and answer.json()["cancellationReason"] == "patient-removed"
        )

    await eventually(cancelled, timeout=60)


async def test_analytics_count_a_new_registration_through_the_gateway(gateway, admin):
    analyst = await new_user(gateway, admin, Role.ANALYST)
    receptionist = await new_user(gateway, admin, Role.RECEPTIONIST)
    day = "2024-02-29"
    params = {"from": day, "to": day, "interval": "day"}
    before = await gateway.get(
        "/api/analytics/registrations", params=params, headers=analyst.headers
    )
    assert before.status_code == 200, before.text
    created = await gateway.post(
        "/api/patients", json=body(registeredDate=day), headers=receptionist.headers
    )
    assert created.status_code == 201

    async def counted() -> bool:
        after = await gateway.get(
            "/api/analytics/registrations", params=params, headers=analyst.headers
        )
        return (
            after.json()["buckets"][0]["registrations"]
            == before.json()["buckets"][0]["registrations"] + 1
        )

    await eventually(counted, timeout=60)
    refused = await gateway.get(
        "/api/analytics/registrations", params=params, headers=receptionist.headers
    )
    assert refused.status_code == 403
