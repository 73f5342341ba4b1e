"""Which stored and published fields are a patient's personal data, and whose they are.

Personal fields never reach the event store, its snapshots or Kafka in the clear: each is
sealed (encrypted) with the data key of the patient it is about, the *subject*. Erasing a
patient destroys that key, and every copy of the fields becomes unreadable at once
(crypto-shredding), while the history around them (ids, event types, times) stays.

This module only names the fields; `runtime.crypto` seals and opens them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any
from uuid import UUID

SEALED_PREFIX = "sealed:v1:"
"""How a sealed value starts: `sealed:v1:<subject uuid>:<base64 nonce + ciphertext>`."""


@dataclass(frozen=True)
class Personal:
    """The personal fields of one kind of record and the field naming their subject.

    `subject` is the attribute that holds the subject's id; None: the record's own
    aggregate id (its originator). `dates` are the fields held as dates in the clear.
    """

    fields: tuple[str, ...]
    subject: str | None = None
    dates: frozenset[str] = frozenset()

    def subject_of(self, originator_id: UUID, state: dict[str, Any]) -> UUID | None:
        if self.subject is None:
            return originator_id
        value = state.get(self.subject)
        return value if isinstance(value, UUID) else None


PATIENT_DETAILS = Personal(
    ("name", "given_name", "family_name", "email", "address", "date_of_birth"),
    dates=frozenset({"date_of_birth"}),
)
"""A patient's details: the patient is the subject."""

APPOINTMENT_REASON = Personal(("reason",), subject="patient_id")
"""Why an appointment was booked: its patient is the subject."""

STORED: dict[str, Personal] = {
    "domain.patients:Patient.Registered": PATIENT_DETAILS,
    "domain.patients:Patient.DetailsChanged": PATIENT_DETAILS,
    "domain.scheduling:Appointment.Booked": APPOINTMENT_REASON,
}
"""Stored event topic → its personal fields."""

SNAPSHOTS: dict[str, Personal] = {
    "domain.patients:Patient": PATIENT_DETAILS,
    "domain.scheduling:Appointment": APPOINTMENT_REASON,
}
"""Aggregate topic → the personal fields of its snapshots' state."""


def is_sealed(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SEALED_PREFIX)


def subject_of_token(token: str) -> UUID | None:
    """The subject a sealed value belongs to, or None if it is not a sealed value."""
    if not is_sealed(token):
        return None
    try:
        return UUID(token[len(SEALED_PREFIX) :].split(":", 1)[0])
    except ValueError:
        return None


def in_clear(value: str, dated: bool) -> str | date:
    """An opened value as the aggregate holds it."""
    return date.fromisoformat(value) if dated else value


def as_text(value: object) -> str:
    """A value to seal, as text."""
    return value.isoformat() if isinstance(value, date) else str(value)
