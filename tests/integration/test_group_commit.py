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
from uuid import UUID, uuid4

import psycopg
import pytest
from eventsourcing.persistence import IntegrityError, PersistenceError, Recording
from psycopg import sql

from commands import service as service_module
from commands.group_commit import GroupCommit
from commands.service import PatientService
from commands.store import EventStore
from domain.errors import EmailTaken, PatientErased, PatientNotFound, StaleVersion
from domain.patients import EmailClaim, Patient, email_claim_id
from runtime.crypto import Keyring
from tests.support.patients import details
from tests.support.stack import claim_key

pytestmark = pytest.mark.integration

WAIT = 10.0
"""How long to wait for a thread to get somewhere before calling the test broken."""

REGISTERED = date(2024, 1, 2)


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


@pytest.fixture
def threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The calls the patient service hands to a thread, by name, in order."""
    calls: list[str] = []
    real = service_module.in_thread

    async def counted(fn: Any, *args: Any) -> Any:
        calls.append(fn.__name__)
        return await real(fn, *args)

    monkeypatch.setattr(service_module, "in_thread", counted)
    return calls


async def test_a_change_of_a_cached_patient_is_decided_in_the_loop(cached, store, threads):
    """A patient this process saved, changed at the version the client read and keeping
    the email: no thread, no read; answered with the new version and its event's position."""
    service = PatientService(cached, claim_key())
    registered = await service.register_async(details("Before"), REGISTERED)
    kept = details("After", email=registered.patient.email.upper())
    written = await service.change_async(registered.patient_id, kept, 1, "corr-loop")
    assert threads == []
    assert (written.patient_id, written.version) == (registered.patient_id, 2)
    stored = cached.recorder.select_notifications(written.position, 1)[0]
    assert (stored.originator_id, stored.originator_version) == (registered.patient_id, 2)
    event = cached.mapper.to_domain_event(stored)
    assert getattr(event, "correlation_id", None) == "corr-loop"
    assert store.load(registered.patient_id).name == "After"  # read from the table
    assert cached.load(registered.patient_id).version == 2  # and remembered
    again = await service.change_async(registered.patient_id, details("Later", email=kept.email))
    assert again.version == 3 and again.position > written.position
    assert threads == []


async def test_a_change_that_must_read_first_goes_to_a_thread(cached, threads):
    """A new email's claim must be read (and the old one freed), and a patient this process
    has not cached must be read: both are decided in a thread, as `change`."""
    service = PatientService(cached, claim_key())
    registered = await service.register_async(details("Moving"), REGISTERED)
    old, new = registered.patient.email, details().email
    written = await service.change_async(registered.patient_id, details("Moving", email=new))
    assert threads == ["change"] and written.version == 2
    with pytest.raises(EmailTaken):
        await service.register_async(details("Other", email=new), REGISTERED)
    freed = await service.register_async(details("Other", email=old), REGISTERED)
    assert freed.version == 1

    threads.clear()
    cached.repository.cache.get(registered.patient_id, evict=True)  # as if pushed out
    uncached = await service.change_async(registered.patient_id, details("Read", email=new))
    assert threads == ["change"] and uncached.version == 3


async def test_a_stale_if_match_is_refused_with_the_current_version_and_saves_nothing(
    cached, store
):
    service = PatientService(cached, claim_key())
    registered = await service.register_async(details("Once"), REGISTERED)
    email = registered.patient.email
    await service.change_async(registered.patient_id, details("Twice", email=email), 1)
    saves = service.writer.saves
    with pytest.raises(StaleVersion) as refused:
        await service.change_async(registered.patient_id, details("Lost", email=email), 1)
    assert (refused.value.expected, refused.value.actual) == (1, 2)
    assert service.writer.saves == saves
    assert store.load(registered.patient_id).version == 2
    assert store.load(registered.patient_id).name == "Twice"


async def test_unknown_removed_and_erased_patients_are_refused_as_by_change(cached, threads):
    """Each is refused by `change`, in a thread, on fresh state."""
    service = PatientService(cached, claim_key())
    with pytest.raises(PatientNotFound):
        await service.change_async(uuid4(), details())
    removed = await service.register_async(details("Removed"), REGISTERED)
    service.remove(removed.patient_id)
    assert cached.knows(removed.patient_id)
    with pytest.raises(PatientNotFound):
        await service.change_async(removed.patient_id, details(email=removed.patient.email))
    erased = await service.register_async(details("Erased"), REGISTERED)
    service.erase(erased.patient_id, "asked", "admin")
    with pytest.raises(PatientErased):
        await service.change_async(erased.patient_id, details(email=erased.patient.email))
    assert threads == ["change"] * 3


async def test_racing_changes_in_the_loop_with_one_if_match_let_exactly_one_through(
    cached, store, threads
):
    """Each decides on its own copy of the cached patient, so all agree with If-Match and
    their saves conflict in the group commit: one wins, and every loser, decided again on
    fresh state, is refused with the winner's version."""
    service = PatientService(cached, claim_key())
    registered = await service.register_async(details("Raced"), REGISTERED)
    email = registered.patient.email
    results = await asyncio.gather(
        *(
            service.change_async(registered.patient_id, details(f"Racer {i}", email=email), 1)
            for i in range(12)
        ),
        return_exceptions=True,
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, StaleVersion)]
    assert len(won) == 1 and len(refused) == 11, results
    assert won[0].version == 2 and all(r.actual == 2 for r in refused)
    assert len(threads) == 11  # the winner saved from the loop; each loser was refused fresh
    assert store.load(registered.patient_id).version == 2
    assert store.load(registered.patient_id).name == won[0].patient.name


async def test_racing_changes_in_the_loop_without_if_match_are_all_applied_in_turn(cached, store):
    """Each loser is decided again on fresh state and applied after the winners: one
    version each, nothing lost. (Six racers: each loses at most five times, within the
    attempts a change has; more could use them up and answer 409, as in a thread.)"""
    service = PatientService(cached, claim_key())
    registered = await service.register_async(details("Raced"), REGISTERED)
    email = registered.patient.email
    results = await asyncio.gather(
        *(
            service.change_async(registered.patient_id, details(f"Racer {i}", email=email))
            for i in range(6)
        )
    )
    assert sorted(r.version for r in results) == list(range(2, 8))
    assert len({r.position for r in results}) == 6
    for result in results:
        stored = store.recorder.select_notifications(result.position, 1)[0]
        assert (stored.originator_id, stored.originator_version) == (
            registered.patient_id,
            result.version,
        )
        assert store.repository.get(registered.patient_id, version=result.version).name == (
            result.patient.name
        )
    assert cached.load(registered.patient_id).version == 7


@pytest.fixture
def elsewhere(settings, keyring) -> Iterator[PatientService]:
    """A second command process over the same database, with its own cache."""
    other = EventStore(settings.database_url, cache_size=100, keyring=keyring)
    yield PatientService(other, claim_key())
    other.close()


async def test_a_change_in_the_loop_on_a_copy_another_process_made_stale_is_applied_on_top(
    cached, store, elsewhere, threads
):
    """Without If-Match, the loop's save conflicts with the other process's change; the
    retry, on fresh state in a thread, applies this change after that one: nothing lost."""
    service = PatientService(cached, claim_key())
    registered = await service.register_async(details("First"), REGISTERED)
    email = registered.patient.email
    elsewhere.change(registered.patient_id, details("Elsewhere", email=email))
    written = await service.change_async(registered.patient_id, details("Here", email=email))
    assert threads == ["change"]
    assert service.writer.saves == 3  # the registration, the loop's attempt, the fresh one
    assert written.version == 3
    names = [store.repository.get(registered.patient_id, version=v).name for v in (1, 2, 3)]
    assert names == ["First", "Elsewhere", "Here"]
    stored = store.recorder.select_notifications(written.position, 1)[0]
    assert (stored.originator_id, stored.originator_version) == (registered.patient_id, 3)
    assert cached.load(registered.patient_id).version == 3


async def test_an_if_match_another_process_made_stale_is_refused_not_overwritten(
    cached, store, elsewhere
):
    """The loop's copy agrees with the client's If-Match, but the store has moved on: the
    save conflicts, and the fresh decision refuses (412 with the store's version)."""
    service = PatientService(cached, claim_key())
    registered = await service.register_async(details("First"), REGISTERED)
    email = registered.patient.email
    elsewhere.change(registered.patient_id, details("Elsewhere", email=email))
    with pytest.raises(StaleVersion) as refused:
        await service.change_async(registered.patient_id, details("Lost", email=email), 1)
    assert (refused.value.expected, refused.value.actual) == (1, 2)
    assert store.load(registered.patient_id).version == 2
    assert store.load(registered.patient_id).name == "Elsewhere"


async def test_a_failed_save_in_the_loop_leaves_the_cached_patient_as_stored(own_settings):
    """The database refuses the loop's save (an error that is not a conflict, so it is not
    retried): the change is lost and said so, and the cache still holds the stored state,
    so the next change follows it with the next version."""
    ring = Keyring.from_settings(own_settings)
    cache = EventStore(own_settings.database_url, cache_size=100, keyring=ring)
    try:
        service = PatientService(cache, claim_key())
        registered = await service.register_async(details("Stored"), REGISTERED)
        email = registered.patient.email
        with psycopg.connect(own_settings.database_url, autocommit=True) as db:
            db.execute(REFUSE_WRITES_OF.format(sql.Literal(str(registered.patient_id))))
        with pytest.raises(PersistenceError) as failed:
            await service.change_async(registered.patient_id, details("Refused", email=email))
        assert not isinstance(failed.value, IntegrityError)
        with psycopg.connect(own_settings.database_url, autocommit=True) as db:
            db.execute("DROP TRIGGER refuse ON carelog_events")
        assert cache.load(registered.patient_id).version == 1
        written = await service.change_async(registered.patient_id, details("Next", email=email))
        assert written.version == 2
        cold = EventStore(own_settings.database_url, 1, keyring=ring)
        try:
            stored = [cold.repository.get(registered.patient_id, version=v) for v in (1, 2)]
            assert [p.name for p in stored] == ["Stored", "Next"]
            assert cold.load(registered.patient_id).version == 2
        finally:
            cold.close()
    finally:
        cache.close()
        ring.close()


REFUSE_WRITES_OF = sql.SQL("""
CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.originator_id = {0}::uuid THEN
        RAISE EXCEPTION 'refused' USING ERRCODE = 'data_exception';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER refuse BEFORE INSERT ON carelog_events FOR EACH ROW EXECUTE FUNCTION refuse();
""")
"""Makes the database refuse every event of one aggregate (a failure, not a conflict)."""
