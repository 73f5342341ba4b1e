"""Test data: unique patients, and the store's events as the relay would publish them."""

from __future__ import annotations

import uuid
from datetime import date
from typing import Any

from commands.store import EventStore
from domain import contracts
from domain.contracts import Envelope, envelope_for
from domain.patients import PatientDetails
from runtime.crypto import open_payload


def details(name: str = "Ada Lovelace", **overrides: Any) -> PatientDetails:
    fields: dict[str, Any] = {
        "name": name,
        "email": f"p-{uuid.uuid4().hex[:12]}@example.org",
        "address": "12 St James's Square",
        "date_of_birth": date(1990, 12, 10),
    }
    return PatientDetails(**(fields | overrides))


def body(**overrides: Any) -> dict[str, Any]:
    """A register request body with a unique email."""
    fields = {
        "name": "Ada Lovelace",
        "email": f"ada-{uuid.uuid4().hex[:12]}@example.org",
        "address": "12 St James's Square",
        "dateOfBirth": "1990-12-10",
        "registeredDate": "2024-01-02",
    }
    return fields | overrides


def published(
    store: EventStore, start: int = 1, stop: int | None = None
) -> list[tuple[Envelope[Any], Any]]:
    """(envelope, payload) of every public event in the store from `start`, in order, as a
    consumer reads it: published sealed, then opened."""
    out = []
    position = start
    while True:
        batch = store.recorder.select_notifications(position, 1000, stop=stop)
        if not batch:
            return out
        for notification in batch:
            event = store.sealed_mapper.to_domain_event(notification)
            envelope = envelope_for(event, notification.id)
            if envelope is not None:
                out.append((envelope, open_payload(store.keyring, envelope.data)))
        position = batch[-1].id + 1


def sealed_registration(registered_date: date) -> contracts.PatientRegisteredV3:
    """A registration as published for a patient since erased: every personal field a
    token no key opens any more (consumers see `contracts.Unreadable`)."""
    return contracts.PatientRegisteredV3(
        name="x",
        given_name="x",
        family_name="x",
        email="x",
        address="x",
        date_of_birth="x",
        registered_date=registered_date,
    )
