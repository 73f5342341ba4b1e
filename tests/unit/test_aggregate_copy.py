"""The copy a command decides on: equal to the cached aggregate, and independent of it."""

from __future__ import annotations

import copy
from datetime import UTC, date, datetime
from uuid import uuid4

from domain.patients import Patient, PatientDetails
from domain.scheduling import CLINICIAN, Schedule


def patient() -> Patient:
    saved = Patient.register(
        PatientDetails(
            name="Ann Lee",
            email="ann@example.org",
            address="1 Road",
            date_of_birth=date(1970, 1, 1),
        ),
        date(2024, 1, 2),
    )
    saved.collect_events()  # as the cache holds it: saved, nothing pending
    return saved


def test_a_copy_has_the_same_state_and_its_own_pending_events():
    original = patient()
    clone = copy.deepcopy(original)
    assert clone is not original
    assert type(clone) is Patient
    assert vars(clone) == vars(original)
    clone.change_details(
        PatientDetails(
            name="Ann Other",
            email="other@example.org",
            address="2 Road",
            date_of_birth=date(1971, 2, 3),
        )
    )
    assert clone.version == original.version + 1
    assert (original.name, original.email, original.version) == ("Ann Lee", "ann@example.org", 1)
    assert len(clone.collect_events()) == 1
    assert original.collect_events() == []


def test_a_copy_of_an_aggregate_with_a_mutable_state_does_not_share_it():
    day = date(2030, 1, 7)
    original = Schedule.open(CLINICIAN, uuid4(), day)
    first = uuid4()
    original.reserve(
        first, datetime(2030, 1, 7, 9, tzinfo=UTC), datetime(2030, 1, 7, 10, tzinfo=UTC)
    )
    original.collect_events()
    clone = copy.deepcopy(original)
    assert vars(clone) == vars(original)
    clone.reserve(
        uuid4(), datetime(2030, 1, 7, 11, tzinfo=UTC), datetime(2030, 1, 7, 12, tzinfo=UTC)
    )
    clone.release(first)
    assert list(original.entries) == [first]
    assert len(clone.entries) == 1 and first not in clone.entries


def test_values_that_cannot_change_are_shared_and_containers_are_not():
    original = Schedule.open(CLINICIAN, uuid4(), date(2030, 1, 7))
    clone = copy.deepcopy(original)
    assert clone.owner_id is original.owner_id
    assert clone.day is original.day
    assert clone.entries is not original.entries
    assert clone._pending_events is not original._pending_events
