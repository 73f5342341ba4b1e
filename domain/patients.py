"""The Patient aggregate and the email claims that keep emails unique.

Uniqueness across aggregates is kept by an `EmailClaim` aggregate whose id is
derived from the normalised email: an HMAC-SHA256 under a secret key
(`email_claim_id`), so an id in the store, on a wire or in an error says nothing
about the address to anyone without the key. Registering or changing a patient
saves the patient and the claims it takes or releases in one transaction, so two
writers racing for one email conflict on the claim's version and one loses.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import date
from uuid import UUID, uuid4, uuid5

from eventsourcing.domain import event

from domain.errors import EmailTaken, InvalidData, PatientErased, PatientNotFound
from domain.events import TracedAggregate

NAME_MAX = 100
ADDRESS_MAX = 200
EMAIL_MAX = 254
ERASE_REASON_MAX = 200
"""An erasure's reason is operator text (a request reference), never personal data."""
MAX_AGE_YEARS = 150

_EMAIL = re.compile(r"^[^@\s]+@[^@\s.]+(\.[^@\s.]+)+$")
# C0 controls and DEL: never part of a name, email or address (PostgreSQL text
# cannot even hold NUL, so such an event could never be projected).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
"""For addresses, which may span lines."""
_CLAIMS = UUID("7f0c4c3e-4d0a-4f5e-9a53-2b1f6c0d9e11")


def normalise_email(email: str) -> str:
    """The form in which two emails are compared: trimmed, case-folded."""
    return email.strip().casefold()


def email_claim_id(email: str, key: bytes) -> UUID:
    """The id of the claim on an email address: HMAC-SHA256 of the normalised email
    under `key`, its first 128 bits as a version-8 UUID (RFC 9562)."""
    digest = bytearray(
        hmac.new(key, normalise_email(email).encode("utf-8"), hashlib.sha256).digest()[:16]
    )
    digest[6] = (digest[6] & 0x0F) | 0x80  # version 8: "custom"
    digest[8] = (digest[8] & 0x3F) | 0x80  # the RFC 9562 variant
    return UUID(bytes=bytes(digest))


def unkeyed_email_claim_id(email: str) -> UUID:
    """The id claims had before they were keyed: a uuid5 anyone can compute from the
    address. No command uses it; it describes the stores `carelog claims rekey` moves
    (which it finds by their ids' version, 5)."""
    return uuid5(_CLAIMS, normalise_email(email))


def split_name(name: str) -> tuple[str, str]:
    """(given names, family name) of a full name: the family name is its last word.

    A one-word name is a given name with an empty family name. Used by version 2 of
    `Registered` and by the upcaster that turns stored version-1 events into it.
    """
    words = name.split()
    if len(words) < 2:
        return name.strip(), ""
    return " ".join(words[:-1]), words[-1]


def _years_before(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year - years)
    except ValueError:  # 29 February
        return day.replace(year=day.year - years, day=28)


@dataclass(frozen=True)
class PatientDetails:
    """The changeable facts about a patient, already checked."""

    name: str
    email: str
    address: str
    date_of_birth: date

    @classmethod
    def parse(
        cls, *, name: object, email: object, address: object, date_of_birth: object, today: date
    ) -> PatientDetails:
        """Checks every field and reports all that are wrong at once."""
        errors: dict[str, str] = {}
        details = _details(errors, name, email, address, date_of_birth, today)
        if details is None:
            raise InvalidData(errors)
        return details


def _details(
    errors: dict[str, str],
    name: object,
    email: object,
    address: object,
    date_of_birth: object,
    today: date,
) -> PatientDetails | None:
    """The checked details, or None with what is wrong added to `errors`."""
    before = len(errors)
    clean_name = _text(errors, "name", name, NAME_MAX)
    clean_address = _text(errors, "address", address, ADDRESS_MAX, lines=True)
    clean_email = _text(errors, "email", email, EMAIL_MAX)
    if "email" not in errors and not _EMAIL.match(clean_email):
        errors["email"] = "must be a valid email address"
    dob = _date(errors, "dateOfBirth", date_of_birth)
    if dob is not None:
        if dob > today:
            errors["dateOfBirth"] = "must not be in the future"
        elif dob < _years_before(today, MAX_AGE_YEARS):
            errors["dateOfBirth"] = f"must be within the last {MAX_AGE_YEARS} years"
    if len(errors) > before or dob is None:
        return None
    return PatientDetails(clean_name, clean_email, clean_address, dob)


def parse_registration(
    *,
    name: object,
    email: object,
    address: object,
    date_of_birth: object,
    registered_date: object,
    today: date,
) -> tuple[PatientDetails, date]:
    """Checks a registration's fields and reports all that are wrong at once."""
    errors: dict[str, str] = {}
    details = _details(errors, name, email, address, date_of_birth, today)
    day = _date(errors, "registeredDate", registered_date)
    if day is not None and details is not None and day < details.date_of_birth:
        errors["registeredDate"] = "must not be before dateOfBirth"
    if errors or details is None or day is None:
        raise InvalidData(errors)
    return details, day


def parse_change(
    *,
    name: object,
    email: object,
    address: object,
    date_of_birth: object,
    registered_date: object = None,
    today: date,
) -> PatientDetails:
    """Checks a change's fields; `registeredDate` may be sent but never changes."""
    errors: dict[str, str] = {}
    details = _details(errors, name, email, address, date_of_birth, today)
    if registered_date is not None:
        _date(errors, "registeredDate", registered_date)
    if errors or details is None:
        raise InvalidData(errors)
    return details


def _text(errors: dict[str, str], field: str, value: object, most: int, lines: bool = False) -> str:
    if value is None:
        errors[field] = "is required"
        return ""
    if not isinstance(value, str):
        errors[field] = "must be a string"
        return ""
    if not value.strip():
        errors[field] = "must not be blank"
        return ""
    if (_CONTROL_BUT_LINES if lines else _CONTROL).search(value):
        errors[field] = "must not contain control characters"
        return ""
    value = value.strip()
    if len(value) > most:
        errors[field] = f"must be at most {most} characters"
    return value


def _date(errors: dict[str, str], field: str, value: object) -> date | None:
    if isinstance(value, date):
        return value
    if value is None:
        errors[field] = "is required"
        return None
    if not isinstance(value, str):
        errors[field] = "must be an ISO date string (YYYY-MM-DD)"
        return None
    try:
        if len(value) != 10:
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        errors[field] = "must be an ISO date (YYYY-MM-DD)"
        return None


def parse_erasure(*, reason: object) -> str:
    """Checks an erasure's reason: required, one line, at most ERASE_REASON_MAX characters."""
    errors: dict[str, str] = {}
    clean = _text(errors, "reason", reason, ERASE_REASON_MAX)
    if errors:
        raise InvalidData(errors)
    return clean


class Patient(TracedAggregate):
    """A person registered with the practice. Removal keeps the history; erasure keeps
    the history and makes every personal field in it unreadable (see domain.privacy)."""

    class Registered(TracedAggregate.Created):
        """Version 2 also records the name split into given and family names."""

        class_version = 2
        name: str
        email: str
        address: str
        date_of_birth: date
        registered_date: date
        given_name: str
        family_name: str

        @staticmethod
        def upcast_v1_v2(state: dict[str, object]) -> None:
            """A stored version-1 event, as version 2: its name split as `split_name` does."""
            state["given_name"], state["family_name"] = split_name(str(state["name"]))

    @staticmethod
    def create_id() -> UUID:
        return uuid4()

    @classmethod
    def register(
        cls, details: PatientDetails, registered_date: date, patient_id: UUID | None = None
    ) -> Patient:
        """A new patient; `patient_id` chosen by the caller (an idempotent create) or new."""
        if registered_date < details.date_of_birth:
            raise InvalidData({"registeredDate": "must not be before dateOfBirth"})
        given, family = split_name(details.name)
        # `_create` is what calling the class does, with the id chosen here when given.
        return cls._create(
            cls.Registered,
            id=patient_id,
            name=details.name,
            email=details.email,
            address=details.address,
            date_of_birth=details.date_of_birth,
            registered_date=registered_date,
            given_name=given,
            family_name=family,
        )

    @event(Registered)
    def __init__(
        self,
        name: str,
        email: str,
        address: str,
        date_of_birth: date,
        registered_date: date,
        given_name: str,
        family_name: str,
    ):
        self.name = name
        self.email = email
        self.address = address
        self.date_of_birth = date_of_birth
        self.registered_date = registered_date
        self.removed = False
        self.reminders = True
        """Whether the patient wants non-essential mail (appointment reminders)."""

    @property
    def details(self) -> PatientDetails:
        return PatientDetails(self.name, self.email, self.address, self.date_of_birth)

    def change_details(self, details: PatientDetails) -> None:
        """Records the new details; a change that changes nothing records nothing."""
        self._require_current()
        if details == self.details:
            return
        self._details_changed(
            name=details.name,
            email=details.email,
            address=details.address,
            date_of_birth=details.date_of_birth,
        )

    @event("DetailsChanged")
    def _details_changed(self, name: str, email: str, address: str, date_of_birth: date) -> None:
        self.name = name
        # After an erasure its sealed values open to nothing (None), the name's parts too.
        self.given_name, self.family_name = split_name(name) if name is not None else (None, None)
        self.email = email
        self.address = address
        self.date_of_birth = date_of_birth

    def set_preferences(self, reminders: bool) -> None:
        """Records the patient's mail preferences; setting what is set records nothing."""
        self._require_current()
        if reminders != self.reminders:
            self._preferences_changed(reminders=reminders)

    @event("PreferencesChanged")
    def _preferences_changed(self, reminders: bool) -> None:
        self.reminders = reminders

    def remove(self) -> None:
        self._require_current()
        self._removed()

    @event("Removed")
    def _removed(self) -> None:
        self.removed = True

    @property
    def erased(self) -> bool:
        return bool(getattr(self, "_erased", False))

    def erase(self, reason: str, erased_by: str) -> None:
        """Records the erasure (the data key is destroyed beside it). A removed patient can
        be erased; an erased one is gone."""
        if self.erased:
            raise PatientErased(str(self.id))
        self._erased_event(reason=reason, erased_by=erased_by)

    @event("Erased")
    def _erased_event(self, reason: str, erased_by: str) -> None:
        self._erased = True
        self.name = self.given_name = self.family_name = None  # type: ignore[assignment]
        self.email = self.address = None  # type: ignore[assignment]
        self.date_of_birth = None  # type: ignore[assignment]

    def _require_current(self) -> None:
        if self.erased:
            raise PatientErased(str(self.id))
        if self.removed:
            raise PatientNotFound(str(self.id))


class EmailClaim(TracedAggregate):
    """Which current patient, if any, holds an email address. Holds no email itself."""

    @staticmethod
    def create_id(claim: UUID) -> UUID:
        return claim

    @classmethod
    def take(cls, claim_id: UUID, patient_id: UUID) -> EmailClaim:
        """The claim `claim_id` (`email_claim_id` of the email), held by `patient_id`."""
        return cls(claim=claim_id, patient_id=patient_id)

    @event("Created")
    def __init__(self, claim: UUID, patient_id: UUID):
        self.holder: UUID | None = patient_id

    def claim(self, patient_id: UUID) -> None:
        if self.holder == patient_id:
            return
        if self.holder is not None:
            raise EmailTaken()
        self._claimed(patient_id=patient_id)

    @event("Claimed")
    def _claimed(self, patient_id: UUID) -> None:
        self.holder = patient_id

    def release(self, patient_id: UUID) -> None:
        if self.holder == patient_id:
            self._released()

    @event("Released")
    def _released(self) -> None:
        self.holder = None
