"""Published events: every type round-trips, and the committed schemas match the code."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, date, datetime
from pathlib import Path

import msgspec
import pytest

from bootstrap.cli import schemas
from domain import contracts
from domain.patients import Patient, PatientDetails

TODAY = date(2026, 6, 15)


def _events_of_every_type() -> list[object]:
    patient = Patient.register(
        PatientDetails("Ada", "ada@example.org", "1 Main St", date(1990, 1, 2)), TODAY
    )
    patient.change_details(
        PatientDetails("Ada L", "ada@example.org", "2 Main St", date(1990, 1, 2))
    )
    patient.set_preferences(reminders=False)
    patient.remove()
    patient.erase("request 42", "admin-1")
    return [*patient.collect_events(), *_scheduling_events()]


def _scheduling_events() -> list[object]:
    from datetime import UTC, datetime, timedelta
    from uuid import uuid4

    from domain.scheduling import (
        Appointment,
        Booking,
        Clinician,
        Timing,
        parse_clinician,
        parse_working_hours,
    )

    hours = {"mon": [["09:00", "17:00"]]}
    clinician = Clinician.register(
        parse_clinician(
            name="Dr Who", email="who@example.org", timezone="Europe/London", working_hours=hours
        )
    )
    clinician.change_working_hours(parse_working_hours({"tue": [["09:00", "12:00"]]}))
    off = uuid4()
    start = datetime(2030, 1, 7, 10, tzinfo=UTC)
    clinician.add_time_off(off, start, start + timedelta(hours=1))
    clinician.remove_time_off(off)
    clinician.link_user(uuid4())
    booking = Booking(uuid4(), clinician.id, Timing(start, 30), "check-up")
    first = Appointment.book(booking)
    first.reschedule(Timing(start + timedelta(hours=1), 30))
    first.check_in()
    first.complete()
    second = Appointment.book(booking)
    second.cancel("patient asked")
    third = Appointment.book(booking)
    third.mark_no_show()
    return [
        *clinician.collect_events(),
        *first.collect_events(),
        *second.collect_events(),
        *third.collect_events(),
    ]


def test_every_published_event_type_is_produced_by_the_aggregate():
    produced = {type(e) for e in _events_of_every_type()}
    assert produced == set(contracts.CONTRACTS)


@pytest.mark.parametrize("position", [1, 2**53])
def test_every_event_round_trips_through_its_envelope(position: int):
    for event in _events_of_every_type():
        object.__setattr__(event, "correlation_id", "req-1")
        envelope = contracts.envelope_for(event, position)
        assert envelope is not None
        encoded = msgspec.json.encode(envelope)
        decoded, data = contracts.decode(encoded)
        assert decoded.type == envelope.type
        assert decoded.aggregate_id == event.originator_id
        assert decoded.aggregate_version == event.originator_version
        assert decoded.position == position
        assert decoded.correlation_id == "req-1"
        assert decoded.occurred_at == event.timestamp
        # Unsealed (a store without a keyring), a date travels as its ISO text.
        assert msgspec.json.encode(data) == msgspec.json.encode(envelope.data)
        assert json.loads(encoded)["data"] == json.loads(msgspec.json.encode(envelope.data))


def test_the_wire_names_are_camel_case():
    event = _events_of_every_type()[0]
    wire = json.loads(msgspec.json.encode(contracts.envelope_for(event, 7)))
    assert {"eventId", "schemaVersion", "aggregateId", "aggregateVersion", "occurredAt"} <= set(
        wire
    )
    assert set(wire["data"]) == {
        "name",
        "givenName",
        "familyName",
        "email",
        "address",
        "dateOfBirth",
        "registeredDate",
    }


def test_an_unknown_event_type_is_refused():
    event = _events_of_every_type()[0]
    wire = json.loads(msgspec.json.encode(contracts.envelope_for(event, 7)))
    wire["type"] = "PatientTeleported"
    with pytest.raises(KeyError):
        contracts.decode(json.dumps(wire).encode())


def test_the_committed_schemas_match_the_code(capsys: pytest.CaptureFixture[str]):
    assert schemas("check") == 0, capsys.readouterr().err


def test_the_schema_check_notices_a_changed_schema(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import bootstrap.cli

    monkeypatch.setattr(bootstrap.cli, "SCHEMAS_DIR", tmp_path)
    assert schemas("write") == 0
    target = next(tmp_path.rglob("PatientRegistered.v1.json"))
    schema = json.loads(target.read_text())
    schema["$defs"]["PatientRegisteredV1"]["required"].remove("email")
    target.write_text(json.dumps(schema))
    assert schemas("check") == 1


def test_the_correlation_id_is_a_declared_field_of_every_patient_event():
    import dataclasses

    from domain.events import correlated
    from domain.patients import EmailClaim, Patient, PatientDetails, email_claim_id

    for event_class in (Patient.Registered, Patient.DetailsChanged, Patient.Removed):
        assert "correlation_id" in {f.name for f in dataclasses.fields(event_class)}
    details = PatientDetails("Ada", "ada@example.org", "1 Street", date(1990, 1, 1))
    with correlated("corr-declared"):
        patient = Patient.register(details, date(2024, 1, 1))
        claim = EmailClaim.take(email_claim_id(details.email, b"k" * 32), patient.id)
    patient.remove()
    recorded = [*patient.collect_events(), *claim.collect_events()]
    assert [e.correlation_id for e in recorded] == ["corr-declared", None, "corr-declared"]


def test_a_stored_version_1_registration_reads_as_version_2():
    import json as _json

    from eventsourcing.persistence import StoredEvent

    from commands.store import EventStore

    store = EventStore.in_memory()
    patient = Patient.register(
        PatientDetails("Ada King Lovelace", "a@example.org", "1 St", date(1990, 1, 2)), TODAY
    )
    store.save(patient)
    stored = store.recorder.select_notifications(1, 1)[0]
    state = _json.loads(stored.state)
    assert state["class_version"] == 2 and state["family_name"] == "Lovelace"
    for key in ("class_version", "given_name", "family_name"):
        del state[key]
    old = StoredEvent(
        stored.originator_id, stored.originator_version, stored.topic, _json.dumps(state).encode()
    )
    event = store.mapper.to_domain_event(old)
    assert (event.given_name, event.family_name) == ("Ada King", "Lovelace")
    envelope = contracts.envelope_for(event, 1)
    assert envelope is not None and envelope.schema_version == 3


def test_a_published_version_1_message_is_read_as_version_2():
    v1 = contracts.PatientRegisteredV1(
        name="Grace Hopper",
        email="g@example.org",
        address="1 St",
        date_of_birth=date(1906, 12, 9),
        registered_date=date(2024, 1, 2),
    )
    message = msgspec.json.encode(
        contracts.envelope(
            v1,
            aggregate_id=uuid.uuid4(),
            aggregate_version=1,
            position=5,
            occurred_at=datetime.now(UTC),
        )
    )
    envelope, data = contracts.decode(message)
    assert envelope.schema_version == 1
    assert isinstance(data, contracts.PatientRegisteredV2)
    assert (data.given_name, data.family_name, data.name) == ("Grace", "Hopper", "Grace Hopper")
