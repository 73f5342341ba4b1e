"""Group commit on the real event store: shared transactions, and only losers fail.

Whether saves share a transaction by chance depends on thread timing, so the test
that proves they do holds the first commit open until the others have queued.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import Recording

from commands.group_commit import GroupCommit
from commands.service import PatientService
from commands.store import EventStore
from domain.errors import EmailTaken
from domain.patients import EmailClaim, Patient, email_claim_id
from tests.support.patients import details
from tests.support.stack import claim_key

pytestmark = pytest.mark.integration

WAIT = 10.0
"""How long to wait for a thread to get somewhere before calling the test broken."""


class GatedStore:
    """The event store, except that its first save waits until the test opens the gate."""

    def __init__(self, store: EventStore):
        self.store = store
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.calls: list[set[UUID]] = []
        """The aggregates whose events each `save` call wrote, in call order."""
        self._lock = threading.Lock()

    def save(self, *events: Any) -> list[Recording[Any]]:
        with self._lock:
            first = not self.calls
            self.calls.append({e.originator_id for e in events})
        if first:
            self.entered.set()
            assert self.gate.wait(WAIT), "the test never opened the gate"
        return self.store.save(*events)

    def remember(self, saved: Any) -> None:
        self.store.remember(saved)


def queued(writer: GroupCommit) -> int:
    """How many saves wait for a leader (GroupCommit has no public view of its queue)."""
    with writer._lock:
        return len(writer._queue)


def test_saves_made_during_a_commit_are_committed_together_each_with_its_own_recordings(
    store: EventStore,
):
    gated = GatedStore(store)
    writer = GroupCommit(gated, max_batch=64)  # type: ignore[arg-type]
    followers = 8
    saves = []
    for i in range(1 + followers):
        patient = Patient.register(details(f"Queued {i}"), date(2024, 1, 1))
        saves.append(
            (patient, EmailClaim.take(email_claim_id(patient.email, claim_key()), patient.id))
        )

    with ThreadPoolExecutor(1 + followers) as pool:
        leading = pool.submit(writer.save, *saves[0])
        assert gated.entered.wait(WAIT), "the first save never reached the store"
        following = [pool.submit(writer.save, *pair) for pair in saves[1:]]
        deadline = time.monotonic() + WAIT
        while queued(writer) < followers:
            assert time.monotonic() < deadline, f"only {queued(writer)} saves queued"
            time.sleep(0.001)
        gated.gate.set()
        results = [leading.result(WAIT)] + [f.result(WAIT) for f in following]

    assert (writer.batches, writer.saves) == (2, 1 + followers)
    ids = [{patient.id, claim.id} for patient, claim in saves]
    assert gated.calls == [ids[0], set().union(*ids[1:])], "the queued saves were not one commit"
    positions = []
    for (patient, claim), recordings in zip(saves, results, strict=True):
        assert sorted(str(r.domain_event.originator_id) for r in recordings) == sorted(
            [str(patient.id), str(claim.id)]
        )
        positions += [r.notification.id for r in recordings]
        assert store.repository.get(patient.id).name == patient.name
    assert len(set(positions)) == 2 * (1 + followers)


def test_concurrent_saves_each_get_their_own_recordings(store: EventStore):
    service = PatientService(store, claim_key())
    start = threading.Barrier(24)

    def register(i: int):
        start.wait()
        return service.register(details(f"Group {i}"), date(2024, 1, 1))

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(register, range(24)))
    assert service.writer.saves == 24
    positions = [r.position for r in results]
    assert len(set(positions)) == 24
    for result in results:
        stored = store.recorder.select_notifications(result.position, 1)[0]
        assert stored.originator_id == result.patient_id
        assert store.repository.get(result.patient_id).name == result.patient.name


def test_a_conflict_inside_a_batch_fails_only_the_loser(store: EventStore):
    service = PatientService(store, claim_key())
    shared = details("Contested").email
    start = threading.Barrier(16)

    def register(i: int):
        start.wait()
        d = details(f"Mixed {i}", email=shared) if i < 2 else details(f"Mixed {i}")
        try:
            return service.register(d, date(2024, 1, 1))
        except EmailTaken as exc:
            return exc

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(register, range(16)))
    contested = results[:2]
    assert sorted(type(r).__name__ for r in contested) == ["EmailTaken", "Written"]
    assert all(type(r).__name__ == "Written" for r in results[2:])


def test_a_batch_is_stored_as_given_and_answered_with_its_positions_in_order(store):
    """The recorder sends a batch's events as four arrays: each row holds its own event's
    id, version, topic and bytes, and the positions come back in the events' order,
    ascending, one per event."""
    service = PatientService(store, claim_key())
    patients = [Patient.register(details(f"Batch {i}"), date(2024, 1, 2)) for i in range(5)]
    for patient in patients[:2]:
        patient.change_details(details(f"Batch changed {patient.id}"))
    events = [e for p in patients for e in p.collect_events()]
    recordings = service.store.save(*events)
    assert [r.domain_event for r in recordings] == events
    positions = [r.notification.id for r in recordings]
    assert positions == sorted(positions) and len(set(positions)) == len(events)
    stored = {
        (n.originator_id, n.originator_version): (n.id, n.topic, n.state)
        for n in store.recorder.select_notifications(start=positions[0], limit=len(events))
    }
    for event, recording in zip(events, recordings, strict=True):
        position, topic, state = stored[(event.originator_id, event.originator_version)]
        assert position == recording.notification.id
        assert topic == recording.notification.topic and state == recording.notification.state
    assert [store.load(p.id).version for p in patients] == [2, 2, 1, 1, 1]


@pytest.fixture
def cached(settings, keyring) -> Iterator[EventStore]:
    """A store that keeps what it saves in memory, as the command process's does."""
    store = EventStore(settings.database_url, cache_size=100, keyring=keyring)
    yield store
    store.close()


async def test_saves_awaited_in_the_loop_share_commits_with_each_other_and_with_threads(
    cached: EventStore,
):
    """Registrations decided in the event loop wait as futures, not threads: those made
    while a commit is under way share the next one, whether they came from the loop or
    from a thread, and each gets its own patient and position, remembered in the cache."""
    store = cached
    service = PatientService(store, claim_key())
    from_threads = 8
    in_loop = [service.register_async(details(f"Loop {i}"), date(2024, 1, 1)) for i in range(24)]
    threads = [
        asyncio.to_thread(service.register, details(f"Thread {i}"), date(2024, 1, 1))
        for i in range(from_threads)
    ]
    results = await asyncio.gather(*in_loop, *threads)
    assert service.writer.saves == 24 + from_threads
    assert service.writer.batches < service.writer.saves, "no save shared a commit"
    positions = [r.position for r in results]
    assert None not in positions and len(set(positions)) == len(results)
    for result in results:
        stored = store.recorder.select_notifications(result.position, 1)[0]
        assert stored.originator_id == result.patient_id
        assert store.knows(result.patient_id), "not remembered in the cache"
        assert store.load(result.patient_id).name == result.patient.name


async def test_a_registration_in_the_loop_whose_email_another_process_took_is_refused(
    settings, keyring, cached
):
    """The loop's registration takes a new email's claim blind; when another process
    holds it (this one's cache does not know it), the save conflicts, and the retry, on
    fresh state in a thread, answers EmailTaken and stores nothing."""
    first = cached
    other = EventStore(settings.database_url, cache_size=100, keyring=keyring)
    try:
        taken = details("Taken Elsewhere")
        PatientService(other, claim_key()).register(taken, date(2024, 1, 1))
        service = PatientService(first, claim_key())
        assert not first.knows(service.claim_id(taken.email))
        with pytest.raises(EmailTaken):
            await service.register_async(details("Second", email=taken.email), date(2024, 1, 1))
        assert service.writer.saves == 1  # the blind attempt, then the fresh refusal
        again = await service.register_async(details("Unrelated"), date(2024, 1, 1))
        assert first.load(again.patient_id).name == "Unrelated"
    finally:
        other.close()
