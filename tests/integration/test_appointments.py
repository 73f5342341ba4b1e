"""Appointments against the real event store and read model: invariants under concurrency,
transitions, roles, and the queries (list, one, clinicians, free slots, minPosition)."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from commands.api import create_app as commands_app
from commands.store import EventStore
from domain.roles import Role
from projections.appointments import AppointmentsProjection
from read_api.app import create_app as read_app
from runtime.db import open_pool
from runtime.settings import Settings
from tests.support.patients import body, published
from tests.support.tokens import TestTokens

pytestmark = pytest.mark.integration

ALWAYS = {day: [["00:00", "24:00"]] for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}


def monday(weeks_ahead: int = 2, hour: int = 10) -> datetime:
    """A Monday at `hour`:00 UTC, some weeks from now (always in the future)."""
    today = datetime.now(UTC).replace(hour=hour, minute=0, second=0, microsecond=0)
    return today + timedelta(days=(7 - today.weekday()) + 7 * (weeks_ahead - 1))


def at(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


@pytest.fixture
async def writes(
    settings: Settings, store: EventStore, tokens: TestTokens
) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(app=commands_app(settings, store, tokens.verifier)) as client:
        client.headers.update(tokens.headers(Role.ADMIN))
        yield client


@pytest.fixture
async def reads(settings: Settings, tokens: TestTokens) -> AsyncIterator[AsyncTestClient[Any]]:
    app = read_app(settings.with_(read_wait_seconds=0.5), verifier=tokens.verifier)
    async with AsyncTestClient(app=app) as client:
        client.headers.update(tokens.headers(Role.RECEPTIONIST))
        yield client


class Model:
    """Applies the store's appointment events to the read model, as the projection does."""

    def __init__(self, settings: Settings, store: EventStore):
        self.settings = settings
        self.store = store
        self.projection = AppointmentsProjection()

    async def catch_up(self) -> None:
        batch = [(e, d) for e, d in published(self.store) if e.aggregate_type != "Patient"]
        pool = await open_pool(self.settings.database_url, min_size=1, max_size=1)
        try:
            async with pool.connection() as conn:
                await self.projection.apply(conn, batch)
        finally:
            await pool.close()


@pytest.fixture
def model(settings: Settings, store: EventStore) -> Model:
    return Model(settings, store)


async def clinician(writes: AsyncTestClient[Any], hours: Any = None, zone: str = "UTC") -> str:
    created = await writes.post(
        "/clinicians",
        json={
            "name": f"Dr {uuid.uuid4().hex[:6]}",
            "email": f"dr-{uuid.uuid4().hex[:8]}@example.org",
            "timezone": zone,
            "workingHours": hours or ALWAYS,
        },
    )
    assert created.status_code == 201, created.text
    assert created.headers["location"] == f"/clinicians/{created.json()['id']}"
    return str(created.json()["id"])


async def patient(writes: AsyncTestClient[Any]) -> str:
    created = await writes.post("/patients", json=body())
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


async def book(
    writes: AsyncTestClient[Any],
    patient_id: str,
    clinician_id: str,
    start: datetime,
    minutes: int = 30,
    **headers: str,
) -> Any:
    return await writes.post(
        "/appointments",
        json={
            "patientId": patient_id,
            "clinicianId": clinician_id,
            "start": at(start),
            "durationMinutes": minutes,
            "reason": "annual check-up",
        },
        headers=headers,
    )


async def test_booking_answers_201_with_location_etag_and_position(writes):
    doctor, person = await clinician(writes), await patient(writes)
    answer = await book(writes, person, doctor, monday())
    assert answer.status_code == 201, answer.text
    booked = answer.json()
    assert booked["status"] == "booked"
    assert answer.headers["location"] == f"/appointments/{booked['id']}"
    assert answer.headers["etag"] == '"1"'
    assert int(answer.headers["event-position"]) == booked["position"] > 0


async def test_thirty_concurrent_overlapping_bookings_give_exactly_one_201(writes):
    doctor = await clinician(writes)
    people = [await patient(writes) for _ in range(30)]
    start = monday(3)
    answers = await asyncio.gather(
        *(
            book(writes, person, doctor, start + timedelta(minutes=5 * (i % 6)))
            for i, person in enumerate(people)
        )
    )
    statuses = Counter(a.status_code for a in answers)
    assert statuses == {201: 1, 409: 29}, statuses
    winner = next(a.json()["id"] for a in answers if a.status_code == 201)
    for refused in (a for a in answers if a.status_code == 409):
        assert refused.json()["reason"] == "clinician-busy"
        assert refused.json()["conflictingAppointmentId"] == winner


async def test_a_patient_cannot_be_in_two_places(writes):
    person = await patient(writes)
    first, second = await clinician(writes), await clinician(writes)
    start = monday(4)
    assert (await book(writes, person, first, start, 60)).status_code == 201
    clash = await book(writes, person, second, start + timedelta(minutes=30))
    assert clash.status_code == 409
    assert clash.json()["reason"] == "patient-busy"
    assert (await book(writes, person, second, start + timedelta(minutes=60))).status_code == 201


async def test_outside_working_hours_and_time_off_are_409(writes):
    weekdays = {"mon": [["09:00", "17:00"]], "tue": [["09:00", "17:00"]]}
    doctor = await clinician(writes, weekdays, "Europe/London")
    person = await patient(writes)
    sunday = monday(2, hour=11) - timedelta(days=1)
    late = monday(2, hour=19)
    for start in (sunday, late):
        refused = await book(writes, person, doctor, start)
        assert refused.status_code == 409, refused.text
        assert refused.json()["reason"] == "outside-working-hours"
    off_start = monday(2, hour=12)
    added = await writes.post(
        f"/clinicians/{doctor}/time-off",
        json={"start": at(off_start), "end": at(off_start + timedelta(hours=2))},
    )
    assert added.status_code == 201, added.text
    refused = await book(writes, person, doctor, off_start + timedelta(minutes=30))
    assert refused.json()["reason"] == "outside-working-hours"
    removed = await writes.delete(f"/clinicians/{doctor}/time-off/{added.json()['timeOffId']}")
    assert removed.status_code == 204
    assert (
        await book(writes, person, doctor, off_start + timedelta(minutes=30))
    ).status_code == 201


async def test_a_removed_patient_cannot_book_and_unknown_ids_are_400(writes):
    doctor, person = await clinician(writes), await patient(writes)
    assert (await writes.delete(f"/patients/{person}")).status_code == 204
    refused = await book(writes, person, doctor, monday())
    assert refused.status_code == 409
    assert refused.json()["reason"] == "patient-removed"
    unknown = await book(writes, str(uuid.uuid4()), str(uuid.uuid4()), monday())
    assert unknown.status_code == 400
    assert set(unknown.json()["errors"]) == {"patientId", "clinicianId"}


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"durationMinutes": 7}, {"durationMinutes"}),
        ({"durationMinutes": 245, "reason": ""}, {"durationMinutes", "reason"}),
        ({"start": "2030-01-07T10:00:00"}, {"start"}),
        (
            {"start": "2001-01-01T10:00:00Z", "patientId": "x", "extra": 1},
            {"start", "patientId", "extra"},
        ),
        ({"clinicianId": None, "durationMinutes": "30"}, {"clinicianId", "durationMinutes"}),
    ],
)
async def test_malformed_bookings_are_400_naming_each_field(writes, fields, named):
    request = {
        "patientId": str(uuid.uuid4()),
        "clinicianId": str(uuid.uuid4()),
        "start": at(monday()),
        "durationMinutes": 30,
        "reason": "check",
    } | fields
    answer = await writes.post("/appointments", json=request)
    assert answer.status_code == 400, answer.text
    assert set(answer.json()["errors"]) == named


async def test_transitions_follow_the_status_machine_and_free_the_slot(writes):
    doctor, person, other = await clinician(writes), await clinician(writes), await patient(writes)
    person = await patient(writes)
    start = monday(5)
    booked = (await book(writes, person, doctor, start)).json()
    path = f"/appointments/{booked['id']}"
    wrong = await writes.post(f"{path}/complete")
    assert wrong.status_code == 409
    assert wrong.json()["reason"] == "invalid-transition"
    stale = await writes.post(f"{path}/check-in", headers={"If-Match": '"7"'})
    assert stale.status_code == 412
    checked = await writes.post(f"{path}/check-in", headers={"If-Match": '"1"'})
    assert checked.status_code == 200 and checked.json()["status"] == "checked-in"
    assert (await book(writes, other, doctor, start)).status_code == 409
    done = await writes.post(f"{path}/complete")
    assert done.json()["status"] == "completed"
    assert (await writes.post(f"{path}/cancel", json={"reason": "late"})).status_code == 409
    assert (await book(writes, other, doctor, start)).status_code == 201


async def test_reschedule_and_cancel_release_the_old_time(writes):
    doctor, first, second = await clinician(writes), await patient(writes), await patient(writes)
    start = monday(6)
    booked = (await book(writes, first, doctor, start)).json()
    moved = await writes.post(
        f"/appointments/{booked['id']}/reschedule", json={"start": at(start + timedelta(hours=1))}
    )
    assert moved.status_code == 200, moved.text
    assert moved.json()["durationMinutes"] == 30
    assert (await book(writes, second, doctor, start)).status_code == 201
    taken = await book(writes, second, doctor, start + timedelta(hours=1))
    assert taken.json()["reason"] in ("clinician-busy", "patient-busy")
    cancelled = await writes.post(
        f"/appointments/{booked['id']}/cancel", json={"reason": "feeling better"}
    )
    assert cancelled.json()["status"] == "cancelled"
    assert (await book(writes, first, doctor, start + timedelta(hours=1))).status_code == 201


async def test_a_clinician_attends_only_their_own_appointments(writes, tokens):
    mine, theirs, person = await clinician(writes), await clinician(writes), await patient(writes)
    user = str(uuid.uuid4())
    linked = await writes.put(f"/clinicians/{mine}/user", json={"userId": user})
    assert linked.status_code == 200 and linked.json()["userId"] == user
    own = (await book(writes, person, mine, monday(7))).json()
    other = (await book(writes, person, theirs, monday(7, hour=14))).json()
    as_clinician = tokens.headers(Role.CLINICIAN, subject=user)
    refused = await writes.post(f"/appointments/{other['id']}/check-in", headers=as_clinician)
    assert refused.status_code == 403
    allowed = await writes.post(f"/appointments/{own['id']}/check-in", headers=as_clinician)
    assert allowed.status_code == 200, allowed.text
    receptionist = tokens.headers(Role.RECEPTIONIST)
    assert (
        await writes.post(f"/appointments/{own['id']}/complete", headers=receptionist)
    ).status_code == 403


async def test_reads_list_one_clinician_slots_and_reasons_by_role(writes, reads, model, tokens):
    doctor = await clinician(writes, {"mon": [["09:00", "12:00"]]})
    person = await patient(writes)
    day = monday(8, hour=9)
    booked = await book(writes, person, doctor, day + timedelta(hours=1), 60)
    position = int(booked.headers["event-position"])
    early = await reads.get(
        f"/appointments/{booked.json()['id']}", params={"minPosition": position}
    )
    assert early.status_code == 503
    await model.catch_up()

    one = await reads.get(f"/appointments/{booked.json()['id']}", params={"minPosition": position})
    assert one.status_code == 200, one.text
    assert one.json()["reason"] == "annual check-up"
    assert one.headers["etag"] == '"1"'
    hidden = await reads.get(
        f"/appointments/{booked.json()['id']}", headers=tokens.headers(Role.BILLING)
    )
    assert hidden.json()["reason"] is None

    listed = await reads.get("/appointments", params={"clinicianId": doctor})
    assert [a["id"] for a in listed.json()["appointments"]] == [booked.json()["id"]]
    assert listed.json()["next"] is None

    slots = await reads.get(
        f"/clinicians/{doctor}/slots",
        params={"date": day.date().isoformat(), "durationMinutes": 60},
    )
    assert slots.status_code == 200, slots.text
    starts = [datetime.fromisoformat(s["start"]) for s in slots.json()["slots"]]
    assert starts == [day, day + timedelta(hours=2)]

    clinician_row = await reads.get(f"/clinicians/{doctor}")
    hours = clinician_row.json()["workingHours"]
    assert hours["mon"] == [["09:00", "12:00"]]
    assert not any(hours[day] for day in ("tue", "wed", "thu", "fri", "sat", "sun"))
    assert (await reads.get(f"/clinicians/{uuid.uuid4()}")).status_code == 404
    assert (await reads.get("/appointments/not-an-id")).status_code == 404


async def test_paging_by_cursor_visits_every_appointment_once(writes, reads, model):
    doctor = await clinician(writes)
    start = monday(9)
    made = []
    for i in range(7):
        answer = await book(writes, await patient(writes), doctor, start + timedelta(hours=i))
        made.append(answer.json()["id"])
    await model.catch_up()
    seen: list[str] = []
    cursor = None
    while True:
        params = {"clinicianId": doctor, "limit": 3} | ({"cursor": cursor} if cursor else {})
        page = (await reads.get("/appointments", params=params)).json()
        seen += [a["id"] for a in page["appointments"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == made


async def test_bad_query_parameters_are_400_naming_each(reads):
    answer = await reads.get(
        "/appointments",
        params={"limit": 0, "status": "lost", "from": "yesterday", "clinicianId": "x", "bogus": 1},
    )
    assert answer.status_code == 400
    assert set(answer.json()["errors"]) == {"limit", "status", "from", "clinicianId", "bogus"}
    cursor = await reads.get("/appointments", params={"limit": "x", "cursor": "garbage"})
    assert set(cursor.json()["errors"]) == {"limit", "cursor"}
    clinicians = await reads.get("/clinicians", params={"limit": 0, "cursor": "garbage"})
    assert set(clinicians.json()["errors"]) == {"limit", "cursor"}
    slots = await reads.get(
        f"/clinicians/{uuid.uuid4()}/slots", params={"date": "monday", "durationMinutes": 7}
    )
    assert slots.status_code == 400
    assert set(slots.json()["errors"]) == {"date", "durationMinutes"}
