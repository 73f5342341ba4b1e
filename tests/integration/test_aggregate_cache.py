"""The command process's aggregate cache and snapshots, on the real event store.

Two caching stores over one database stand for two command processes: each one's
cache goes stale when the other writes, and every answer must still be the one the
store's current state gives (no lost update, no false 412, 404 or 409).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from uuid import UUID

import psycopg
import pytest

from commands.scheduling import SchedulingService
from commands.service import PatientService
from commands.store import CACHE_SIZE, SNAPSHOT_INTERVAL, EventStore
from domain.errors import EmailTaken, PatientNotFound, StaleVersion
from domain.patients import Patient
from domain.scheduling import Booking, PatientRemoved, Timing, parse_clinician
from runtime.settings import Settings
from tests.support.patients import details
from tests.support.stack import claim_key

pytestmark = pytest.mark.integration

REGISTERED = date(2024, 1, 2)
ALWAYS = {day: [["00:00", "24:00"]] for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}


@pytest.fixture
def two(own_settings: Settings) -> Iterator[tuple[PatientService, PatientService]]:
    stores = [EventStore(own_settings.database_url, 2, cache_size=CACHE_SIZE) for _ in range(2)]
    yield PatientService(stores[0], claim_key()), PatientService(stores[1], claim_key())
    for store in stores:
        store.close()


def events_of(settings: Settings, aggregate_id: UUID) -> int:
    with psycopg.connect(settings.database_url) as db:
        row = db.execute(
            "SELECT count(*) FROM carelog_events WHERE originator_id = %s", [aggregate_id]
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_a_change_on_a_stale_copy_is_decided_again_on_the_stored_state(two, own_settings):
    a, b = two
    patient = a.register(details("First Name"), REGISTERED).patient_id
    b.change(patient, details("Changed Elsewhere"))
    # a's cached copy is at version 1; the store is at 2.
    written = a.change(patient, details("Changed Here"))
    assert written.version == 3
    assert b.store.load(patient, current=True).name == "Changed Here"
    assert events_of(own_settings, patient) == 3


def test_if_match_is_judged_against_the_store_not_a_stale_copy(two):
    a, b = two
    patient = a.register(details(), REGISTERED).patient_id
    b.change(patient, details("Version Two"))
    # The client read version 2 (from b); a's copy says 1, which must not give 412.
    assert a.change(patient, details("Version Three"), expected_version=2).version == 3
    # A client still holding version 2 now loses, from either process.
    with pytest.raises(StaleVersion):
        a.change(patient, details("Lost Update"), expected_version=2)
    with pytest.raises(StaleVersion):
        b.change(patient, details("Lost Update"), expected_version=2)


def test_a_patient_removed_elsewhere_is_not_found_here(two):
    a, b = two
    patient = a.register(details(), REGISTERED).patient_id
    b.remove(patient)
    with pytest.raises(PatientNotFound):
        a.change(patient, details())


def test_an_email_freed_elsewhere_can_be_taken_here(two):
    a, b = two
    email = details().email
    first = a.register(details(email=email), REGISTERED).patient_id
    with pytest.raises(EmailTaken):
        a.register(details(email=email), REGISTERED)
    # a has cached the claim as held; b frees it.
    b.remove(first)
    second = a.register(details(email=email), REGISTERED)
    assert second.patient_id != first
    with pytest.raises(EmailTaken):
        b.register(details(email=email), REGISTERED)


def test_a_new_email_costs_no_read_and_a_taken_one_is_still_refused(two, own_settings):
    a, b = two
    email = details().email
    b.register(details(email=email), REGISTERED)
    # a has never seen this email: it takes the claim blind, the save conflicts, the
    # retry reads the claim and refuses.
    with pytest.raises(EmailTaken):
        a.register(details(email=email), REGISTERED)
    with psycopg.connect(own_settings.database_url) as db:
        row = db.execute(
            "SELECT count(*) FROM carelog_events WHERE topic LIKE %s", ["%Patient.Registered"]
        ).fetchone()
    assert row == (1,)


def test_snapshots_are_taken_and_a_cold_read_gives_the_same_patient(two, own_settings):
    a, _ = two
    patient = a.register(details(), REGISTERED).patient_id
    for i in range(2 * SNAPSHOT_INTERVAL + 5):
        a.change(patient, details(f"Name {i}"))
    with psycopg.connect(own_settings.database_url) as db:
        versions = [
            r[0]
            for r in db.execute(
                "SELECT originator_version FROM carelog_snapshots WHERE originator_id = %s"
                " ORDER BY 1",
                [patient],
            )
        ]
    assert versions == [SNAPSHOT_INTERVAL, 2 * SNAPSHOT_INTERVAL]
    cold = EventStore(own_settings.database_url, 1)
    try:
        read = cold.load(patient)
        assert isinstance(read, Patient)
        assert read.version == 2 * SNAPSHOT_INTERVAL + 6
        assert read.name == f"Name {2 * SNAPSHOT_INTERVAL + 4}"
        # The same state as replaying every event, without the snapshots.
        replayed = cold.repository.get(patient, version=read.version)
        assert vars(replayed) == vars(read)
    finally:
        cold.close()


def test_a_booking_sees_a_patient_removed_by_another_process(two):
    """The patient is only read by a booking, so no version check would catch a stale copy."""
    a, b = two
    scheduling = SchedulingService(a.store, a.writer)
    clinician = scheduling.register_clinician(
        parse_clinician(
            name="Dr Cache", email="cache@example.org", timezone="UTC", working_hours=ALWAYS
        )
    ).id
    patient = a.register(details(), REGISTERED).patient_id
    assert a.store.knows(patient)
    b.remove(patient)
    start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=2)
    with pytest.raises(PatientRemoved):
        scheduling.book(Booking(patient, clinician, Timing(start, 30), "check-up"))
