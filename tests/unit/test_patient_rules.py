"""The Patient aggregate's rules, and that replaying its events rebuilds it exactly."""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from domain.errors import EmailTaken, InvalidData, PatientNotFound
from domain.patients import (
    EmailClaim,
    Patient,
    PatientDetails,
    email_claim_id,
    normalise_email,
    parse_change,
    parse_registration,
    unkeyed_email_claim_id,
)

TODAY = date(2026, 6, 15)

printable = st.characters(blacklist_categories=("Cc", "Cs"))
names = st.text(printable, min_size=1, max_size=100).filter(lambda s: s.strip() == s and s.strip())
emails = st.builds(
    lambda user, host: f"{user}@{host}.example",
    st.from_regex(r"[a-z0-9._+-]{1,20}", fullmatch=True),
    st.from_regex(r"[a-z0-9-]{1,20}", fullmatch=True),
)
births = st.dates(min_value=date(1877, 1, 1), max_value=TODAY)
details = st.builds(
    PatientDetails,
    name=names,
    email=emails,
    address=st.text(printable, min_size=1, max_size=200).filter(
        lambda s: s.strip() == s and s.strip()
    ),
    date_of_birth=births,
)


def registration(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "name": "Ada Lovelace",
        "email": "ada@example.org",
        "address": "12 St James's Square",
        "date_of_birth": "1990-12-10",
        "registered_date": "2024-01-02",
        "today": TODAY,
    }
    return fields | overrides


def test_a_valid_registration_parses():
    parsed, registered = parse_registration(**registration())
    assert parsed.name == "Ada Lovelace"
    assert parsed.date_of_birth == date(1990, 12, 10)
    assert registered == date(2024, 1, 2)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "", "must not be blank"),
        ("name", "x" * 101, "must be at most 100 characters"),
        ("name", None, "is required"),
        ("name", 42, "must be a string"),
        ("email", "not-an-email", "must be a valid email address"),
        ("email", "a@b", "must be a valid email address"),
        ("address", "   ", "must not be blank"),
        ("name", "Ada\x00Lovelace", "must not contain control characters"),
        ("email", "ada\t@example.org", "must not contain control characters"),
        ("address", "12 Square\x00", "must not contain control characters"),
        ("date_of_birth", "2026-06-16", "must not be in the future"),
        ("date_of_birth", "1876-06-14", "must be within the last 150 years"),
        ("date_of_birth", "10/12/1990", "must be an ISO date (YYYY-MM-DD)"),
        ("date_of_birth", "1990-02-30", "must be an ISO date (YYYY-MM-DD)"),
        ("registered_date", None, "is required"),
        ("registered_date", "1980-01-01", "must not be before dateOfBirth"),
    ],
)
def test_each_rule_names_its_field(field: str, value: Any, message: str):
    wire = {"date_of_birth": "dateOfBirth", "registered_date": "registeredDate"}.get(field, field)
    with pytest.raises(InvalidData) as raised:
        parse_registration(**registration(**{field: value}))
    assert raised.value.errors == {wire: message}


def test_an_address_may_span_lines():
    parsed, _ = parse_registration(**registration(address="12 St James's Square\nLondon"))
    assert parsed.address == "12 St James's Square\nLondon"


def test_every_wrong_field_is_reported_at_once():
    with pytest.raises(InvalidData) as raised:
        parse_registration(
            name="", email="x", address=None, date_of_birth="soon", registered_date=1, today=TODAY
        )
    assert set(raised.value.errors) == {"name", "email", "address", "dateOfBirth", "registeredDate"}


def test_the_oldest_allowed_birth_date_is_exactly_150_years_ago():
    assert parse_change(**registration(date_of_birth="1876-06-15", registered_date=None))


def test_a_change_may_carry_registered_date_but_it_must_be_a_date():
    with pytest.raises(InvalidData) as raised:
        parse_change(**registration(registered_date="yesterday"))
    assert raised.value.errors == {"registeredDate": "must be an ISO date (YYYY-MM-DD)"}


KEY = b"unit-test-claim-key-of-at-least-32-bytes"


def test_emails_are_compared_without_case_or_surrounding_space():
    assert email_claim_id(" Ada@Example.org", KEY) == email_claim_id("ada@example.org", KEY)
    assert email_claim_id("ada@example.org", KEY) != email_claim_id("ada@example.com", KEY)


@given(emails)
def test_a_claim_id_depends_on_the_key_and_is_not_the_unkeyed_uuid5(email: str):
    other = b"another-claim-key-also-32-bytes-long"
    keyed = email_claim_id(email, KEY)
    assert keyed != email_claim_id(email, other)
    assert keyed != unkeyed_email_claim_id(email)
    assert keyed.version == 8
    assert unkeyed_email_claim_id(email).version == 5
    # Nothing of the address shows: the id is the HMAC's bits, not the email's.
    assert normalise_email(email).encode() not in keyed.bytes
    assert keyed.hex not in normalise_email(email)


def test_a_claim_id_is_the_hmac_sha256_of_the_normalised_email_under_the_key():
    import hashlib
    import hmac

    digest = hmac.new(KEY, b"ada@example.org", hashlib.sha256).digest()
    keyed = email_claim_id(" ADA@example.org ", KEY)
    # Every bit but the six that mark the UUID's version and variant comes from the HMAC.
    assert keyed.bytes[:6] == digest[:6]
    assert keyed.bytes[6] & 0x0F == digest[6] & 0x0F
    assert keyed.bytes[7] == digest[7]
    assert keyed.bytes[8] & 0x3F == digest[8] & 0x3F
    assert keyed.bytes[9:16] == digest[9:16]


def test_a_claimed_email_cannot_be_claimed_by_another_patient_until_released():
    first, second = Patient.create_id(), Patient.create_id()
    claim = EmailClaim.take(email_claim_id("ada@example.org", KEY), first)
    with pytest.raises(EmailTaken):
        claim.claim(second)
    claim.release(second)  # not the holder: changes nothing
    assert claim.holder == first
    claim.release(first)
    claim.claim(second)
    assert claim.holder == second


def test_a_removed_patient_can_be_neither_changed_nor_removed_again():
    patient = Patient.register(parse_registration(**registration())[0], date(2024, 1, 2))
    patient.remove()
    with pytest.raises(PatientNotFound):
        patient.remove()
    with pytest.raises(PatientNotFound):
        patient.change_details(patient.details)


def test_a_change_that_changes_nothing_records_nothing():
    patient = Patient.register(parse_registration(**registration())[0], date(2024, 1, 2))
    patient.collect_events()
    patient.change_details(patient.details)
    assert patient.collect_events() == []
    assert patient.version == 1


@given(details, st.integers(min_value=0, max_value=20_000))
def test_any_valid_details_round_trip_through_parsing(d: PatientDetails, age_days: int):
    parsed = PatientDetails.parse(
        name=d.name,
        email=d.email,
        address=d.address,
        date_of_birth=d.date_of_birth.isoformat(),
        today=max(TODAY, d.date_of_birth + timedelta(days=age_days)),
    )
    assert parsed == d


def state_of(patient: Patient) -> dict[str, Any]:
    return {k: v for k, v in vars(patient).items() if not k.startswith("_")}


def replay(events: list[Any]) -> Patient:
    aggregate = None
    for event in events:
        aggregate = event.mutate(aggregate)
    assert isinstance(aggregate, Patient)
    return aggregate


class PatientLifecycle(RuleBasedStateMachine):
    """Any sequence of valid commands keeps the invariants, and replay rebuilds the state."""

    def __init__(self) -> None:
        super().__init__()
        self.patient: Patient | None = None
        self.history: list[Any] = []

    @precondition(lambda self: self.patient is None)
    @rule(d=details)
    def register(self, d: PatientDetails) -> None:
        self.patient = Patient.register(d, TODAY)
        self.history += self.patient.collect_events()

    @precondition(lambda self: self.patient is not None)
    @rule(d=details)
    def change(self, d: PatientDetails) -> None:
        assert self.patient is not None
        before = self.patient.version
        if self.patient.removed:
            with pytest.raises(PatientNotFound):
                self.patient.change_details(d)
        else:
            self.patient.change_details(d)
            assert self.patient.details == d
        new = self.patient.collect_events()
        assert self.patient.version == before + len(new)
        self.history += new

    @precondition(lambda self: self.patient is not None)
    @rule()
    def remove(self) -> None:
        assert self.patient is not None
        if self.patient.removed:
            with pytest.raises(PatientNotFound):
                self.patient.remove()
        else:
            self.patient.remove()
            assert self.patient.removed
        self.history += self.patient.collect_events()

    @invariant()
    def replaying_the_history_rebuilds_the_same_state(self) -> None:
        if self.patient is None:
            return
        assert [e.originator_version for e in self.history] == list(range(1, len(self.history) + 1))
        assert state_of(replay(self.history)) == state_of(self.patient)


TestPatientLifecycle = PatientLifecycle.TestCase
TestPatientLifecycle.settings = settings(max_examples=60, stateful_step_count=15, deadline=None)


def test_an_erased_patient_keeps_its_history_and_refuses_every_change():
    from domain.errors import PatientErased
    from domain.patients import parse_erasure

    details = PatientDetails("Ada Lovelace", "ada@example.org", "1 St", date(1990, 1, 2))
    patient = Patient.register(details, TODAY)
    patient.remove()
    patient.erase(parse_erasure(reason="  request R-7 "), "admin-1")  # a removed one too
    assert patient.erased and patient.name is None and patient.email is None
    events = patient.collect_events()
    assert [type(e).__name__ for e in events] == ["Registered", "Removed", "Erased"]
    assert (events[-1].reason, events[-1].erased_by) == ("request R-7", "admin-1")
    with pytest.raises(PatientErased):
        patient.erase("again", "admin-1")
    with pytest.raises(PatientErased):
        patient.change_details(details)
    with pytest.raises(PatientErased):
        patient.set_preferences(reminders=False)
    replayed = None
    for event in events:
        replayed = event.mutate(replayed)
    assert replayed is not None and replayed.erased and replayed.version == 3


@pytest.mark.parametrize(
    ("reason", "error"),
    [(None, "is required"), ("  ", "must not be blank"), ("a\x00b", "control"), ("x" * 201, "200")],
)
def test_an_erasure_reason_is_required_short_and_one_line(reason: object, error: str):
    from domain.patients import parse_erasure

    with pytest.raises(InvalidData) as refused:
        parse_erasure(reason=reason)
    assert error in refused.value.errors["reason"]
