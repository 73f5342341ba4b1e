"""Group commit on the real event store: shared transactions, and only losers fail."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import date

import pytest

from commands.service import PatientService
from commands.store import EventStore
from domain.errors import EmailTaken
from tests.support.patients import details

pytestmark = pytest.mark.integration


def test_concurrent_saves_share_transactions_and_each_gets_its_own_recordings(store: EventStore):
    service = PatientService(store)
    start = threading.Barrier(24)

    def register(i: int):
        start.wait()
        return service.register(details(f"Group {i}"), date(2024, 1, 1))

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(register, range(24)))
    assert service.writer.saves == 24
    assert service.writer.batches < 24, "no save shared a transaction"
    positions = [r.position for r in results]
    assert len(set(positions)) == 24
    for result in results:
        stored = store.recorder.select_notifications(result.position, 1)[0]
        assert stored.originator_id == result.patient_id
        assert store.repository.get(result.patient_id).name == result.patient.name


def test_a_conflict_inside_a_batch_fails_only_the_loser(store: EventStore):
    service = PatientService(store)
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
