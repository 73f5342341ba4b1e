"""The published form of domain events: what other services read from Kafka.

Each event type and version is a msgspec Struct; `schemas/` holds the JSON Schema
generated from these. A published version never changes: a new shape is a new
version, and readers upcast older ones.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Generic, TypeVar
from uuid import UUID, uuid5

import msgspec

from domain.patients import Patient

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
    data: T


class PatientRegisteredV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    name: str
    email: str
    address: str
    date_of_birth: date
    registered_date: date


class PatientDetailsChangedV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    """Carries every changeable field, so a reader needs no earlier event to apply it."""

    name: str
    email: str
    address: str
    date_of_birth: date


class PatientRemovedV1(msgspec.Struct, rename="camel", kw_only=True, frozen=True):
    pass


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
    Patient.Registered: Contract(  # type: ignore[attr-defined]
        "PatientRegistered", 1, PatientRegisteredV1, "Patient", PATIENT_STREAM
    ),
    Patient.DetailsChanged: Contract(  # type: ignore[attr-defined]
        "PatientDetailsChanged", 1, PatientDetailsChangedV1, "Patient", PATIENT_STREAM
    ),
    Patient.Removed: Contract(  # type: ignore[attr-defined]
        "PatientRemoved", 1, PatientRemovedV1, "Patient", PATIENT_STREAM
    ),
}

BY_TYPE: dict[tuple[str, int], Contract] = {}
"""Every published (type, version), from every context that `publish`ed its contracts."""
BY_PAYLOAD: dict[builtins.type[msgspec.Struct], Contract] = {}


def publish(contracts: Iterable[Contract]) -> None:
    """Registers a context's published contracts with the one envelope constructor and decoder."""
    for contract in contracts:
        BY_TYPE[(contract.type, contract.version)] = contract
        BY_PAYLOAD[contract.payload] = contract


publish(CONTRACTS.values())


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
    )


_raw_envelope = msgspec.json.Decoder(Envelope[msgspec.Raw])


def decode(message: bytes) -> tuple[Envelope[msgspec.Raw], msgspec.Struct]:
    """Decodes a published event; raises msgspec.ValidationError or KeyError if unknown."""
    envelope = _raw_envelope.decode(message)
    contract = BY_TYPE[(envelope.type, envelope.schema_version)]
    return envelope, msgspec.json.decode(envelope.data, type=contract.payload)


def json_schemas(published: Iterable[Contract] | None = None) -> dict[str, dict[str, Any]]:
    """File name → JSON Schema of the whole message, for every published (patient) event."""
    schemas: dict[str, dict[str, Any]] = {}
    for contract in CONTRACTS.values() if published is None else published:
        schema = msgspec.json.schema(Envelope[contract.payload])  # type: ignore[name-defined]
        schema["title"] = f"{contract.type} v{contract.version}"
        schema["$id"] = f"carelog:{contract.stream}:{contract.type}:v{contract.version}"
        schemas[f"{contract.stream}/{contract.type}.v{contract.version}.json"] = schema
    return schemas
