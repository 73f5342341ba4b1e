"""The published form of domain events: what other services read from Kafka.

Each event type and version is a msgspec Struct; `schemas/` holds the JSON Schema
generated from these. A published version never changes: a new shape is a new
version, and readers upcast older ones.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Annotated, Any, Generic, TypeVar
from uuid import UUID, uuid5

import msgspec

from domain.patients import Patient, split_name
from domain.privacy import APPOINTMENT_REASON, PATIENT_DETAILS, Personal
from domain.scheduling import Appointment, Clinician

T = TypeVar("T")


class Envelope(msgspec.Struct, Generic[T], rename="camel", kw_only=True, frozen=True):
    """Wraps every published event; the same facts travel as Kafka headers."""

    event_id: UUID
    """Stable per aggregate version: consumers may deduplicate on it."""
    type: str
    schema_version: int
    aggregate_type: str
    aggregate_id: UUID
    aggregate_version: int
    position: int
    """The event's position in the event store's global log."""
    occurred_at: datetime
    correlation_id: str | None = None
    actor_id: str | None = None
    """Who caused the event: a user's id, or `system:<process>` (None in older messages)."""
    actor_role: str | None = None
    """The role the actor acted in (`system` for a process)."""
    data: T


class PatientRegisteredV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    name: str
    email: str
    address: str
    date_of_birth: date
    registered_date: date


class PatientRegisteredV2(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    """Version 2: `name` as before, and split into `givenName` and `familyName`."""

    name: str
    given_name: str
    family_name: str
    email: str
    address: str
    date_of_birth: date
    registered_date: date


def _registered_v2(old: PatientRegisteredV1) -> PatientRegisteredV2:
    given, family = split_name(old.name)
    return PatientRegisteredV2(
        name=old.name,
        given_name=given,
        family_name=family,
        email=old.email,
        address=old.address,
        date_of_birth=old.date_of_birth,
        registered_date=old.registered_date,
    )


UPCASTERS: dict[builtins.type[msgspec.Struct], Callable[[Any], msgspec.Struct]] = {
    PatientRegisteredV1: _registered_v2,
}
"""An older published payload → the next version; `decode` applies them, so readers see
only the current version of each event."""


class PatientDetailsChangedV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    """Carries every changeable field, so a reader needs no earlier event to apply it."""

    name: str
    email: str
    address: str
    date_of_birth: date


Sealed = Annotated[
    str,
    msgspec.Meta(
        description="A personal field sealed with its patient's data key"
        " (sealed:v1:<patient id>:<base64 nonce and AES-GCM ciphertext>); erasing the patient"
        " makes it unreadable for good. An event stored before sealing began carries the"
        " value in the clear (its ISO form for a date)",
        examples=["sealed:v1:0b6f2a8e-6a4e-4f7e-9a53-2b1f6c0d9e11:bm9uY2UuLi5jaXBoZXJ0ZXh0"],
    ),
]


class PatientRegisteredV3(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    """Version 3: version 2's fields, the personal ones sealed (see `Sealed`)."""

    name: Sealed
    given_name: Sealed
    family_name: Sealed
    email: Sealed
    address: Sealed
    date_of_birth: Sealed
    registered_date: date


class PatientDetailsChangedV2(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    """Version 2: version 1's fields, sealed."""

    name: Sealed
    email: Sealed
    address: Sealed
    date_of_birth: Sealed


class PatientErasedV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    """The patient's data key is destroyed: every sealed field of theirs is unreadable.
    Readers delete or blank whatever personal data of theirs they hold."""

    reason: str
    """Why, as the operator gave it (e.g. a request reference); never personal data."""
    erased_by: str
    """The user who erased the patient."""


class PatientRemovedV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    pass


class PatientPreferencesChangedV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    reminders: bool
    """Whether the patient wants non-essential mail (appointment reminders)."""


class ClinicianRegisteredV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    name: str
    email: str
    timezone: str
    """An IANA time zone, e.g. Europe/London: working hours are in its local time."""
    working_hours: dict[str, list[list[str]]]
    """Weekday (mon..sun) → [start, end) local times as "HH:MM" ("24:00" may end a day)."""


class ClinicianWorkingHoursChangedV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    working_hours: dict[str, list[list[str]]]


class ClinicianTimeOffAddedV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    time_off_id: UUID
    start: datetime
    end: datetime


class ClinicianTimeOffRemovedV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    time_off_id: UUID


class ClinicianUserLinkedV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    user_id: UUID
    """The auth user (role clinician) who is this clinician."""


class AppointmentBookedV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    patient_id: UUID
    clinician_id: UUID
    start: datetime
    duration_minutes: int
    reason: str


class AppointmentBookedV2(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    """Version 2: the reason sealed with the patient's data key."""

    patient_id: UUID
    clinician_id: UUID
    start: datetime
    duration_minutes: int
    reason: Sealed


class AppointmentRescheduledV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    start: datetime
    duration_minutes: int


class AppointmentCancelledV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    reason: str


class AppointmentCheckedInV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    pass


class AppointmentCompletedV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    pass


class AppointmentNoShowV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    pass


STATUS_AFTER: dict[type[msgspec.Struct], str] = {
    AppointmentCancelledV1: "cancelled",
    AppointmentCheckedInV1: "checked-in",
    AppointmentCompletedV1: "completed",
    AppointmentNoShowV1: "no-show",
}
"""The status an appointment has after each status-changing event."""


@dataclass(frozen=True)
class Contract:
    """How one domain event class is published."""

    type: str
    version: int
    payload: builtins.type[msgspec.Struct]
    aggregate_type: str
    stream: str
    """The topic's base name."""

    def payload_from(self, domain_event: object) -> msgspec.Struct:
        fields = self.payload.__struct_fields__
        return self.payload(**{f: getattr(domain_event, f) for f in fields})


PATIENT_STREAM = "patient.events"

CONTRACTS: dict[type, Contract] = {
    Patient.Registered: Contract(
        "PatientRegistered", 3, PatientRegisteredV3, "Patient", PATIENT_STREAM
    ),
    Patient.DetailsChanged: Contract(  # type: ignore[attr-defined]
        "PatientDetailsChanged", 2, PatientDetailsChangedV2, "Patient", PATIENT_STREAM
    ),
    Patient.Erased: Contract(  # type: ignore[attr-defined]
        "PatientErased", 1, PatientErasedV1, "Patient", PATIENT_STREAM
    ),
    Patient.Removed: Contract(  # type: ignore[attr-defined]
        "PatientRemoved", 1, PatientRemovedV1, "Patient", PATIENT_STREAM
    ),
    Patient.PreferencesChanged: Contract(  # type: ignore[attr-defined]
        "PatientPreferencesChanged", 1, PatientPreferencesChangedV1, "Patient", PATIENT_STREAM
    ),
}

APPOINTMENT_STREAM = "appointment.events"
"""Appointments and the clinicians they are booked with, keyed by aggregate id."""

_SCHEDULING: list[tuple[type, str, type[msgspec.Struct], str]] = [
    (Clinician.Registered, "ClinicianRegistered", ClinicianRegisteredV1, "Clinician"),  # type: ignore[attr-defined]
    (
        Clinician.WorkingHoursChanged,  # type: ignore[attr-defined]
        "ClinicianWorkingHoursChanged",
        ClinicianWorkingHoursChangedV1,
        "Clinician",
    ),
    (Clinician.TimeOffAdded, "ClinicianTimeOffAdded", ClinicianTimeOffAddedV1, "Clinician"),  # type: ignore[attr-defined]
    (Clinician.TimeOffRemoved, "ClinicianTimeOffRemoved", ClinicianTimeOffRemovedV1, "Clinician"),  # type: ignore[attr-defined]
    (Clinician.UserLinked, "ClinicianUserLinked", ClinicianUserLinkedV1, "Clinician"),  # type: ignore[attr-defined]
    (Appointment.Rescheduled, "AppointmentRescheduled", AppointmentRescheduledV1, "Appointment"),  # type: ignore[attr-defined]
    (Appointment.Cancelled, "AppointmentCancelled", AppointmentCancelledV1, "Appointment"),  # type: ignore[attr-defined]
    (Appointment.CheckedIn, "AppointmentCheckedIn", AppointmentCheckedInV1, "Appointment"),  # type: ignore[attr-defined]
    (Appointment.Completed, "AppointmentCompleted", AppointmentCompletedV1, "Appointment"),  # type: ignore[attr-defined]
    (Appointment.MarkedNoShow, "AppointmentNoShow", AppointmentNoShowV1, "Appointment"),  # type: ignore[attr-defined]
]
CONTRACTS.update(
    {
        event_class: Contract(name, 1, payload, aggregate, APPOINTMENT_STREAM)
        for event_class, name, payload, aggregate in _SCHEDULING
    }
)
CONTRACTS[Appointment.Booked] = Contract(  # type: ignore[attr-defined]
    "AppointmentBooked", 2, AppointmentBookedV2, "Appointment", APPOINTMENT_STREAM
)

BY_TYPE: dict[tuple[str, int], Contract] = {}
"""Every published (type, version), from every context that `publish`ed its contracts."""
BY_PAYLOAD: dict[builtins.type[msgspec.Struct], Contract] = {}


def publish(contracts: Iterable[Contract]) -> None:
    """Registers a context's published contracts with the one envelope constructor and decoder."""
    for contract in contracts:
        BY_TYPE[(contract.type, contract.version)] = contract
        BY_PAYLOAD[contract.payload] = contract


SUPERSEDED: list[Contract] = [
    Contract("PatientRegistered", 1, PatientRegisteredV1, "Patient", PATIENT_STREAM),
    Contract("PatientRegistered", 2, PatientRegisteredV2, "Patient", PATIENT_STREAM),
    Contract("PatientDetailsChanged", 1, PatientDetailsChangedV1, "Patient", PATIENT_STREAM),
    Contract("AppointmentBooked", 1, AppointmentBookedV1, "Appointment", APPOINTMENT_STREAM),
]
"""Versions no longer published but still read (messages already on the topics). Each has
an upcaster in UPCASTERS, or is what a sealed version opens to (SEALED). Their schemas stay
in `schemas/`."""

SEALED: dict[builtins.type[msgspec.Struct], tuple[builtins.type[msgspec.Struct], Personal]] = {
    PatientRegisteredV3: (PatientRegisteredV2, PATIENT_DETAILS),
    PatientDetailsChangedV2: (PatientDetailsChangedV1, PATIENT_DETAILS),
    AppointmentBookedV2: (AppointmentBookedV1, APPOINTMENT_REASON),
}
"""A payload with sealed fields → the same payload in the clear, and which fields are sealed.
Readers open sealed payloads with the keyring (`runtime.crypto.open_payload`) and so see the
earlier, clear versions, or `Unreadable` once the patient is erased."""


class Unreadable(msgspec.Struct, frozen=True):
    """A sealed payload whose patient is erased: only its non-personal fields can be read.
    Never published; what readers get in place of the clear payload."""

    sealed: msgspec.Struct


def registers(data: Any) -> bool:
    """Whether a patient event as a reader sees it is a registration: readable, or an
    erased patient's (`Unreadable`)."""
    return isinstance(data, PatientRegisteredV2) or (
        isinstance(data, Unreadable) and isinstance(data.sealed, PatientRegisteredV3)
    )


publish([*CONTRACTS.values(), *SUPERSEDED])


def event_id(aggregate_id: UUID, aggregate_version: int) -> UUID:
    return uuid5(aggregate_id, str(aggregate_version))


def envelope(
    data: msgspec.Struct,
    *,
    aggregate_id: UUID,
    aggregate_version: int,
    position: int,
    occurred_at: datetime,
    correlation_id: str | None = None,
    actor_id: str | None = None,
    actor_role: str | None = None,
) -> Envelope[Any]:
    """The envelope of a published payload; its contract supplies type and versions."""
    contract = BY_PAYLOAD[type(data)]
    return Envelope(
        event_id=event_id(aggregate_id, aggregate_version),
        type=contract.type,
        schema_version=contract.version,
        aggregate_type=contract.aggregate_type,
        aggregate_id=aggregate_id,
        aggregate_version=aggregate_version,
        position=position,
        occurred_at=occurred_at,
        correlation_id=correlation_id,
        actor_id=actor_id,
        actor_role=actor_role,
        data=data,
    )


def envelope_for(domain_event: Any, position: int) -> Envelope[Any] | None:
    """The published envelope of a stored domain event, or None if it is internal."""
    contract = CONTRACTS.get(type(domain_event))
    if contract is None:
        return None
    return envelope(
        contract.payload_from(domain_event),
        aggregate_id=domain_event.originator_id,
        aggregate_version=domain_event.originator_version,
        position=position,
        occurred_at=domain_event.timestamp,
        correlation_id=domain_event.correlation_id,
        actor_id=domain_event.actor_id,
        actor_role=domain_event.actor_role,
    )


_raw_envelope = msgspec.json.Decoder(Envelope[msgspec.Raw])


def decode(message: bytes) -> tuple[Envelope[msgspec.Raw], msgspec.Struct]:
    """Decodes a published event; raises msgspec.ValidationError or KeyError if unknown."""
    envelope = _raw_envelope.decode(message)
    contract = BY_TYPE[(envelope.type, envelope.schema_version)]
    data = msgspec.json.decode(envelope.data, type=contract.payload)
    while type(data) in UPCASTERS:
        data = UPCASTERS[type(data)](data)
    return envelope, data


def json_schemas(published: Iterable[Contract] | None = None) -> dict[str, dict[str, Any]]:
    """File name → JSON Schema of the whole message, for every published (patient) event."""
    schemas: dict[str, dict[str, Any]] = {}
    for contract in [*CONTRACTS.values(), *SUPERSEDED] if published is None else published:
        schema = msgspec.json.schema(Envelope[contract.payload])  # type: ignore[name-defined]
        schema["title"] = f"{contract.type} v{contract.version}"
        schema["$id"] = f"carelog:{contract.stream}:{contract.type}:v{contract.version}"
        schemas[f"{contract.stream}/{contract.type}.v{contract.version}.json"] = schema
    return schemas
