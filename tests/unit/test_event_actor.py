"""The actor in event metadata: recorded from the context, carried into worker threads,
published in the envelope, and absent (None) from older events and messages."""

from __future__ import annotations

import contextvars
import threading
from datetime import date

import msgspec

from commands.service import PatientService
from commands.store import EventStore
from domain.contracts import decode, envelope_for
from domain.events import Actor, acting_as, actor_of
from domain.patients import Patient
from tests.support.patients import details, published


def test_events_record_the_actor_they_were_decided_under_and_none_outside_one():
    with acting_as(Actor("user-7", "receptionist")):
        acted = Patient.register(details(), date(2024, 1, 2))
    alone = Patient.register(details(), date(2024, 1, 2))
    (registered,) = acted.collect_events()
    (unattributed,) = alone.collect_events()
    assert (registered.actor_id, registered.actor_role) == ("user-7", "receptionist")
    assert (unattributed.actor_id, unattributed.actor_role) == (None, None)


def test_a_use_case_in_a_worker_thread_records_the_callers_actor():
    store = EventStore.in_memory()
    service = PatientService(store, b"unit-test-claim-key-of-at-least-32-bytes")
    seen: list[str | None] = []
    with acting_as(Actor("user-8", "clinician")):
        # As anyio.to_thread.run_sync does: the worker runs in a copy of the context.
        context = contextvars.copy_context()
        worker = threading.Thread(
            target=lambda: seen.append(
                context.run(service.register, details(), date(2024, 1, 2)).patient.id.hex
            )
        )
        worker.start()
        worker.join()
    (envelope, _), *_ = published(store)
    assert seen and (envelope.actor_id, envelope.actor_role) == ("user-8", "clinician")
    store.close()


def test_a_reaction_takes_its_causes_actor_or_names_its_process():
    assert actor_of("user-9", "admin", "carelog-billing") == Actor("user-9", "admin")
    assert actor_of(None, None, "carelog-billing") == Actor("system:carelog-billing", "system")


def test_a_message_published_before_actors_decodes_with_none():
    with acting_as(Actor("user-1", "admin")):
        event = Patient.register(details(), date(2024, 1, 2)).collect_events()[0]
    envelope = envelope_for(event, 3)
    assert envelope is not None
    raw = msgspec.json.decode(msgspec.json.encode(envelope))
    assert (raw["actorId"], raw["actorRole"]) == ("user-1", "admin")
    del raw["actorId"], raw["actorRole"]
    old, _ = decode(msgspec.json.encode(raw))
    assert (old.actor_id, old.actor_role) == (None, None)
