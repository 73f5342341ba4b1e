"""The command side's use cases on the in-memory event store (no PostgreSQL).

The same PatientService and GroupCommit as in production, on `EventStore.in_memory()`
(eventsourcing's POPO recorders): what it records, where, and what it refuses.
The real store's own behaviour (transactions, positions, the relay) is proved by
tests/integration.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import Notification
from hypothesis import given, settings
from hypothesis import strategies as st

from commands.service import PatientService, Written
from commands.store import EventStore
from domain.errors import EmailTaken, PatientNotFound, StaleVersion
from domain.patients import EmailClaim, Patient, email_claim_id, normalise_email
from tests.support.patients import details, published

REGISTERED = date(2024, 1, 2)
KEY = b"unit-test-claim-key-of-at-least-32-bytes"
"""The key this module's services key email claims under."""


@pytest.fixture
def store() -> Iterator[EventStore]:
    """A store of this test's own, in memory (overrides the session's PostgreSQL store)."""
    event_store = EventStore.in_memory()
    yield event_store
    event_store.close()


@pytest.fixture
def service(store: EventStore) -> PatientService:
    return PatientService(store, KEY)


def log_of(store: EventStore) -> list[Notification]:
    """Every event in the store's global log, in position order."""
    return list(store.recorder.select_notifications(1, 10_000))


def position_of(store: EventStore, aggregate_id: UUID, version: int) -> int:
    (found,) = [
        n.id
        for n in log_of(store)
        if n.originator_id == aggregate_id and n.originator_version == version
    ]
    return found


def claim_on(store: EventStore, email: str) -> EmailClaim:
    claim: object = store.repository.get(email_claim_id(email, KEY))
    assert isinstance(claim, EmailClaim)
    return claim


def holder_of(store: EventStore, email: str) -> UUID | None:
    return claim_on(store, email).holder


def test_the_in_memory_store_transcodes_dates_as_iso_text(service: PatientService):
    written = service.register(details(date_of_birth=date(1990, 12, 10)), REGISTERED)
    stored = log_of(service.store)[0]
    assert b'"date_of_birth":{"_type_":"date_iso","_data_":"1990-12-10"}' in stored.state
    patient = service.get(written.patient_id)
    assert patient.date_of_birth == date(1990, 12, 10)
    assert patient.registered_date == REGISTERED


def test_register_records_the_patient_and_its_email_claim_in_one_save(service: PatientService):
    ada = details("Ada")
    written = service.register(ada, REGISTERED)
    log = log_of(service.store)
    assert [(n.topic, n.originator_id) for n in log] == [
        ("domain.patients:Patient.Registered", written.patient_id),
        ("domain.patients:EmailClaim.Created", email_claim_id(ada.email, KEY)),
    ]
    assert written.version == 1
    assert written.position == position_of(service.store, written.patient_id, 1)
    assert service.get(written.patient_id).details == ada
    assert holder_of(service.store, ada.email) == written.patient_id


def test_positions_count_up_in_save_order(service: PatientService):
    first = service.register(details("First"), REGISTERED)
    second = service.register(details("Second"), REGISTERED)
    changed = service.change(first.patient_id, details("First again"))
    logged = [
        position_of(service.store, first.patient_id, 1),
        position_of(service.store, second.patient_id, 1),
        position_of(service.store, first.patient_id, 2),
    ]
    assert [first.position, second.position, changed.position] == logged
    assert logged == sorted(logged)


def test_an_email_held_by_a_current_patient_cannot_be_registered_in_any_case(
    service: PatientService,
):
    ada = service.register(details(email="ada@example.org"), REGISTERED)
    before = log_of(service.store)
    with pytest.raises(EmailTaken):
        service.register(details("Impostor", email="ADA@Example.ORG"), REGISTERED)
    assert log_of(service.store) == before
    assert holder_of(service.store, "ada@example.org") == ada.patient_id


def test_a_change_moves_the_email_claim_and_frees_the_old_email(service: PatientService):
    ada = service.register(details("Ada", email="ada@example.org"), REGISTERED)
    new_details = details("Ada", email="lovelace@example.org")
    written = service.change(ada.patient_id, new_details)
    assert written.version == 2
    assert written.position == position_of(service.store, ada.patient_id, 2)
    assert service.get(ada.patient_id).details == new_details
    assert holder_of(service.store, "ada@example.org") is None
    assert holder_of(service.store, "lovelace@example.org") == ada.patient_id

    grace = service.register(details("Grace", email="Ada@example.org"), REGISTERED)
    assert holder_of(service.store, "ada@example.org") == grace.patient_id
    with pytest.raises(EmailTaken):
        service.register(details("Grace", email="lovelace@example.org"), REGISTERED)


def test_a_change_of_the_emails_case_only_records_it_and_leaves_the_claim_alone(
    service: PatientService,
):
    ada = service.register(details("Ada", email="ada@example.org"), REGISTERED)
    claim_version = claim_on(service.store, "ada@example.org").version
    written = service.change(ada.patient_id, details("Ada", email="ADA@example.org"))
    assert written.version == 2
    assert service.get(ada.patient_id).email == "ADA@example.org"
    assert claim_on(service.store, "ada@example.org").version == claim_version
    assert holder_of(service.store, "ada@example.org") == ada.patient_id


def test_a_change_to_another_current_patients_email_is_refused_and_records_nothing(
    service: PatientService,
):
    ada = service.register(details("Ada", email="ada@example.org"), REGISTERED)
    service.register(details("Grace", email="grace@example.org"), REGISTERED)
    before = log_of(service.store)
    with pytest.raises(EmailTaken):
        service.change(ada.patient_id, details("Ada", email="Grace@Example.org"))
    assert log_of(service.store) == before
    assert service.get(ada.patient_id).email == "ada@example.org"
    assert holder_of(service.store, "ada@example.org") == ada.patient_id


def test_a_change_that_changes_nothing_records_no_event(service: PatientService):
    ada = service.register(details("Ada"), REGISTERED)
    before = log_of(service.store)
    written = service.change(ada.patient_id, ada.patient.details, expected_version=1)
    assert (written.version, written.position) == (1, None)
    assert log_of(service.store) == before


def test_remove_keeps_the_history_frees_the_email_and_the_patient_is_then_not_found(
    service: PatientService,
):
    ada = service.register(details("Ada", email="ada@example.org"), REGISTERED)
    removed = service.remove(ada.patient_id)
    assert removed.version == 2
    assert removed.position == position_of(service.store, ada.patient_id, 2)
    assert [type(e) for e in service.store.events.get(ada.patient_id)] == [
        Patient.Registered,  # type: ignore[attr-defined]
        Patient.Removed,  # type: ignore[attr-defined]
    ]
    assert holder_of(service.store, "ada@example.org") is None

    before = log_of(service.store)
    with pytest.raises(PatientNotFound):
        service.get(ada.patient_id)
    with pytest.raises(PatientNotFound):
        service.change(ada.patient_id, details("Ada again"))
    with pytest.raises(PatientNotFound):
        service.remove(ada.patient_id)
    assert log_of(service.store) == before

    grace = service.register(details("Grace", email="ada@example.org"), REGISTERED)
    assert holder_of(service.store, "ada@example.org") == grace.patient_id


def test_an_unknown_patient_is_not_found(service: PatientService):
    unknown = uuid4()
    with pytest.raises(PatientNotFound):
        service.get(unknown)
    with pytest.raises(PatientNotFound):
        service.change(unknown, details())
    with pytest.raises(PatientNotFound):
        service.remove(unknown)
    assert log_of(service.store) == []


def test_an_email_claims_id_is_not_a_patient(service: PatientService):
    ada = service.register(details(email="ada@example.org"), REGISTERED)
    assert ada.patient_id != email_claim_id("ada@example.org", KEY)
    with pytest.raises(PatientNotFound):
        service.get(email_claim_id("ada@example.org", KEY))


@pytest.mark.parametrize(
    "command",
    [
        lambda service, pid, version: service.change(pid, details("Other"), version),
        lambda service, pid, version: service.remove(pid, version),
    ],
    ids=["change", "remove"],
)
@pytest.mark.parametrize("wrong", [1, 3])
def test_a_wrong_expected_version_is_stale_and_records_nothing(
    service: PatientService, command: Callable[[PatientService, UUID, int], Written], wrong: int
):
    ada = service.register(details("Ada"), REGISTERED)
    service.change(ada.patient_id, details("Ada v2", email=ada.patient.email))
    before = log_of(service.store)
    with pytest.raises(StaleVersion) as raised:
        command(service, ada.patient_id, wrong)
    assert (raised.value.expected, raised.value.actual) == (wrong, 2)
    assert log_of(service.store) == before

    assert command(service, ada.patient_id, 2).version == 3


def test_the_correlation_id_is_stored_with_each_event_and_published_with_it(
    service: PatientService,
):
    ada = service.register(details("Ada"), REGISTERED, correlation_id="req-1")
    service.change(ada.patient_id, details("Ada v2"), correlation_id="req-2")
    service.remove(ada.patient_id, correlation_id="req-3")
    assert [(e.aggregate_version, e.correlation_id) for e, _ in published(service.store)] == [
        (1, "req-1"),
        (2, "req-2"),
        (3, "req-3"),
    ]
    claims = [n for n in log_of(service.store) if n.originator_id != ada.patient_id]
    assert [
        (n.topic, service.store.mapper.to_domain_event(n).correlation_id)  # type: ignore[attr-defined]
        for n in claims
    ] == [
        ("domain.patients:EmailClaim.Created", "req-1"),
        ("domain.patients:EmailClaim.Created", "req-2"),  # the new email's
        ("domain.patients:EmailClaim.Released", "req-2"),  # the old email's
        ("domain.patients:EmailClaim.Released", "req-3"),
    ]


class RacedWriter:
    """The service's writer, except that a competitor writes just before its first save."""

    def __init__(self, service: PatientService, competitor: Callable[[], object]):
        self.writer = service.writer
        self.competitor = competitor
        self.saves = 0

    def save(self, *objects: Any) -> Any:
        self.saves += 1
        if self.saves == 1:
            self.competitor()
        return self.writer.save(*objects)


def test_a_registration_that_loses_the_email_to_a_concurrent_writer_is_refused(
    service: PatientService,
):
    rival = PatientService(service.store, KEY)
    won: list[Written] = []
    raced = RacedWriter(
        service,
        lambda: won.append(rival.register(details("Rival", email="ada@example.org"), REGISTERED)),
    )
    service.writer = raced  # type: ignore[assignment]
    with pytest.raises(EmailTaken):
        service.register(details("Ada", email="ada@example.org"), REGISTERED)
    assert raced.saves == 1  # the first save lost on the claim's version; the retry refused
    assert holder_of(service.store, "ada@example.org") == won[0].patient_id
    assert [n.topic for n in log_of(service.store)] == [
        "domain.patients:Patient.Registered",
        "domain.patients:EmailClaim.Created",
    ]


def test_a_change_raced_by_another_writer_is_decided_again_and_found_stale(
    service: PatientService,
):
    ada = service.register(details("Ada"), REGISTERED)
    rival = PatientService(service.store, KEY)
    raced = RacedWriter(
        service, lambda: rival.change(ada.patient_id, details("Rival's", email=ada.patient.email))
    )
    service.writer = raced  # type: ignore[assignment]
    with pytest.raises(StaleVersion) as raised:
        service.change(ada.patient_id, details("Mine", email=ada.patient.email), 1)
    assert raced.saves == 1  # the retry found version 2 and refused before saving
    assert (raised.value.expected, raised.value.actual) == (1, 2)
    assert service.get(ada.patient_id).name == "Rival's"


def test_a_change_raced_without_an_expected_version_is_retried_and_applied(
    service: PatientService,
):
    ada = service.register(details("Ada"), REGISTERED)
    rival = PatientService(service.store, KEY)
    raced = RacedWriter(
        service, lambda: rival.change(ada.patient_id, details("Rival's", email=ada.patient.email))
    )
    service.writer = raced  # type: ignore[assignment]
    written = service.change(ada.patient_id, details("Mine", email=ada.patient.email))
    assert raced.saves == 2
    assert written.version == 3
    assert service.get(ada.patient_id).name == "Mine"


def test_of_many_concurrent_registrations_for_one_email_exactly_one_wins(
    service: PatientService,
):
    start = threading.Barrier(8, timeout=30)  # a stuck thread fails the test, not hangs it

    def register(i: int) -> Written | EmailTaken:
        start.wait()
        try:
            email = "Same@Example.org" if i % 2 else "same@example.org"
            return service.register(details(f"P{i}", email=email), REGISTERED)
        except EmailTaken as exc:
            return exc

    with ThreadPoolExecutor(8) as pool:
        outcomes = list(pool.map(register, range(8)))
    winners = [o for o in outcomes if isinstance(o, Written)]
    assert len(winners) == 1
    assert sum(isinstance(o, EmailTaken) for o in outcomes) == 7
    assert holder_of(service.store, "same@example.org") == winners[0].patient_id
    registered = [n for n in log_of(service.store) if n.topic.endswith("Patient.Registered")]
    assert [n.originator_id for n in registered] == [winners[0].patient_id]


def test_concurrent_registrations_for_different_emails_all_commit_at_distinct_positions(
    service: PatientService,
):
    start = threading.Barrier(8, timeout=30)  # a stuck thread fails the test, not hangs it

    def register(i: int) -> Written:
        start.wait()
        return service.register(details(f"P{i}"), REGISTERED)

    with ThreadPoolExecutor(8) as pool:
        written = list(pool.map(register, range(8)))
    assert len({w.position for w in written}) == 8
    for w in written:
        assert w.position == position_of(service.store, w.patient_id, 1)
    assert service.writer.saves == 8


# Any sequence of commands, checked against a model: a few emails in two spellings each.
EMAILS = ["ada@example.org", "ADA@example.org", "grace@example.org", "Grace@Example.org", "x@y.z"]
commands = st.lists(
    st.one_of(
        st.tuples(st.just("register"), st.sampled_from(EMAILS), st.sampled_from(["A", "B"])),
        st.tuples(
            st.just("change"),
            st.integers(0, 5),
            st.sampled_from(EMAILS),
            st.sampled_from(["A", "B"]),
        ),
        st.tuples(st.just("remove"), st.integers(0, 5)),
    ),
    max_size=30,
)


def replay(events: Iterable[Any]) -> Patient:
    aggregate = None
    for event in events:
        aggregate = event.mutate(aggregate)
    assert isinstance(aggregate, Patient)
    return aggregate


def _current(model: dict[UUID, dict[str, Any]], email: str, but: UUID | None = None) -> bool:
    """Whether a current patient other than `but` has `email` (normalised)."""
    return any(
        not p["removed"] and normalise_email(p["email"]) == normalise_email(email)
        for pid, p in model.items()
        if pid != but
    )


@settings(max_examples=75, deadline=None)
@given(commands)
def test_any_command_sequence_keeps_one_current_patient_per_email_and_replays_exactly(
    steps: list[tuple[Any, ...]],
):
    store = EventStore.in_memory()
    service = PatientService(store, KEY)
    model: dict[UUID, dict[str, Any]] = {}
    order: list[UUID] = []
    live: dict[UUID, Patient] = {}
    try:
        for step in steps:
            if step[0] == "register":
                _, email, name = step
                new = details(name, email=email)
                if _current(model, email):
                    with pytest.raises(EmailTaken):
                        service.register(new, REGISTERED)
                    continue
                written = service.register(new, REGISTERED)
                model[written.patient_id] = {"email": email, "removed": False, "version": 1}
                order.append(written.patient_id)
            elif not order:
                continue
            elif step[0] == "change":
                _, index, email, name = step
                pid = order[index % len(order)]
                expected = model[pid]
                new = details(name, email=email)
                if expected["removed"]:
                    with pytest.raises(PatientNotFound):
                        service.change(pid, new)
                    continue
                if _current(model, email, but=pid):
                    with pytest.raises(EmailTaken):
                        service.change(pid, new)
                    continue
                unchanged = live[pid].details == new
                written = service.change(pid, new)
                expected["version"] += 0 if unchanged else 1
                expected["email"] = email
                assert (written.position is None) == unchanged
            else:
                _, index = step
                pid = order[index % len(order)]
                if model[pid]["removed"]:
                    with pytest.raises(PatientNotFound):
                        service.remove(pid)
                    continue
                written = service.remove(pid)
                model[pid]["removed"] = True
                model[pid]["version"] += 1
            assert written.version == model[written.patient_id]["version"]
            live[written.patient_id] = written.patient

        current: dict[str, list[UUID]] = {}
        for pid in order:
            stored: object = store.repository.get(pid)
            assert isinstance(stored, Patient)
            assert (stored.email, stored.removed, stored.version) == (
                model[pid]["email"],
                model[pid]["removed"],
                model[pid]["version"],
            )
            if not stored.removed:
                current.setdefault(normalise_email(stored.email), []).append(pid)
            # What the service held after its last command is what the stored events rebuild.
            assert vars(stored) == vars(live[pid])
            assert vars(replay(store.events.get(pid))) == vars(stored)

        assert all(len(holders) == 1 for holders in current.values())
        for email in {normalise_email(e) for e in EMAILS}:
            holders = current.get(email, [])
            try:
                claimed = holder_of(store, email)
            except AggregateNotFoundError:  # never claimed
                claimed = None
            assert claimed == (holders[0] if holders else None)
    finally:
        store.close()
