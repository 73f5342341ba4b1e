"""Removing a patient cancels their future appointments: a process manager on the real
relay, Kafka, projection and event store, killed with SIGKILL in the middle of its work.
The cancellations carry the removal's correlation id and actor."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from uuid import UUID

from commands.scheduling import SchedulingService
from commands.service import PatientService
from commands.store import EventStore
from domain.events import Actor, acting_as
from domain.scheduling import Appointment, Booking, Timing, parse_clinician
from runtime.settings import Settings
from tests.support.patients import details
from tests.support.stack import Process, claim_key

ALWAYS = {day: [["00:00", "24:00"]] for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}
COUNT = 300


def cancellations(store: EventStore, start: int) -> list[tuple[UUID, str, str | None]]:
    """(appointment id, reason, correlation id) of every cancellation stored from `start`."""
    found = []
    position = start
    while batch := store.recorder.select_notifications(position, 1000):
        for notification in batch:
            event = store.mapper.to_domain_event(notification)
            if isinstance(event, Appointment.Cancelled):  # type: ignore[attr-defined]
                found.append((event.originator_id, event.reason, event.correlation_id))
        position = batch[-1].id + 1
    return found


def cancellers(store: EventStore, start: int) -> set[tuple[str | None, str | None]]:
    """(actor id, role) of every cancellation stored from `start`."""
    return {
        (event.actor_id, event.actor_role)
        for notification in store.recorder.select_notifications(start, 100_000)
        if isinstance(
            event := store.mapper.to_domain_event(notification),
            Appointment.Cancelled,  # type: ignore[attr-defined]
        )
    }


async def wait_for(check, timeout: float = 90.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await asyncio.to_thread(check)
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"not done in {timeout}s")


def _clinician(scheduling: SchedulingService, name: str, email: str) -> UUID:
    """A clinician who works at every hour (any booking time fits)."""
    return scheduling.register_clinician(
        parse_clinician(name=name, email=email, timezone="UTC", working_hours=ALWAYS)
    ).id


async def test_a_killed_process_manager_cancels_every_future_appointment_exactly_once(
    own_settings: Settings, own_store: EventStore, tmp_path: Path
):
    settings, store = own_settings, own_store
    patients, scheduling = PatientService(store, claim_key()), SchedulingService(store)
    person = patients.register(details("Leaving Soon"), date(2024, 1, 1)).patient_id
    clinician = _clinician(scheduling, "Dr Stays", "stays@example.org")
    first = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=2)
    booked = [
        scheduling.book(
            Booking(person, clinician, Timing(first + timedelta(minutes=30 * i), 30), "follow-up")
        ).id
        for i in range(COUNT)
    ]
    start = (store.recorder.max_notification_id() or 0) + 1

    relay = Process(["relay"], settings, "relay", tmp_path / "relay").start()
    model = Process(
        ["project", "appointments"], settings, "appointments", tmp_path / "appointments"
    ).start()
    reactions = Process(
        ["react", "patient-removals"], settings, "reactions", tmp_path / "reactions"
    ).start()
    try:
        with acting_as(Actor("remover-42", "receptionist")):
            patients.remove(person, correlation_id="removal-42")
        done_at_kill = len(await wait_for(lambda: cancellations(store, start)))
        reactions.kill()  # SIGKILL as soon as it has begun cancelling
        assert done_at_kill < COUNT, "the kill came after all the work: nothing was tested"
        reactions.start()

        def all_cancelled() -> list[tuple[UUID, str, str | None]] | None:
            found = cancellations(store, start)
            return found if len({a for a, _, _ in found}) == COUNT else None

        found = await wait_for(all_cancelled)
        await asyncio.sleep(1.0)  # anything applied twice would show up by now
        found = cancellations(store, start)
        assert sorted(a for a, _, _ in found) == sorted(booked)  # each exactly once
        assert {reason for _, reason, _ in found} == {"patient-removed"}
        assert {corr for _, _, corr in found} == {"removal-42"}
        assert cancellers(store, start) == {("remover-42", "receptionist")}
    finally:
        reactions.stop()
        model.stop()
        relay.stop()


async def test_erasing_a_patient_cancels_their_future_appointments_and_no_others(
    own_settings: Settings, own_store: EventStore, tmp_path: Path
):
    settings, store = own_settings, own_store
    patients, scheduling = PatientService(store, claim_key()), SchedulingService(store)
    erased = patients.register(details("Asked To Be Forgotten"), date(2024, 1, 1)).patient_id
    kept = patients.register(details("Stays On"), date(2024, 1, 1)).patient_id
    clinician = _clinician(scheduling, "Dr Erasure", "erasure@example.org")
    first = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) + timedelta(days=2)

    def book(person: UUID, i: int) -> UUID:
        timing = Timing(first + timedelta(minutes=30 * i), 30)
        return scheduling.book(Booking(person, clinician, timing, "private reason")).id

    theirs = [book(erased, i) for i in range(3)]
    others = [book(kept, i) for i in range(3, 5)]
    start = (store.recorder.max_notification_id() or 0) + 1
    processes = [
        Process(["relay"], settings, "relay", tmp_path / "relay").start(),
        Process(
            ["project", "appointments"], settings, "appointments", tmp_path / "appointments"
        ).start(),
        Process(
            ["react", "patient-removals"], settings, "reactions", tmp_path / "reactions"
        ).start(),
    ]
    try:
        with acting_as(Actor("admin-7", "admin")):
            patients.erase(erased, "request 2024-17", "admin-7", correlation_id="erasure-7")

        def all_cancelled() -> list[tuple[UUID, str, str | None]] | None:
            found = cancellations(store, start)
            return found if len(found) >= len(theirs) else None

        await wait_for(all_cancelled)
        await asyncio.sleep(1.0)  # a cancellation of the other patient's would show by now
        found = cancellations(store, start)
        assert sorted(a for a, _, _ in found) == sorted(theirs)
        assert {reason for _, reason, _ in found} == {"patient-erased"}
        assert {corr for _, _, corr in found} == {"erasure-7"}
        assert cancellers(store, start) == {("admin-7", "admin")}
        assert not set(others) & {a for a, _, _ in found}
    finally:
        for process in reversed(processes):
            process.stop()
