"""`carelog history KIND ID`: an aggregate's events in order, personal data redacted.

Each line: version, position in the global log, time, event type, correlation id,
and the event's fields. Names, emails, addresses, dates of birth and appointment
reasons print as `<redacted>` unless `--reveal`, which first appends a record to the
disclosure audit (`runtime.audit`: who, whose, when) and a line to the log, and reveals
nothing when the record cannot be written.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any
from uuid import UUID

import psycopg
import structlog
from psycopg import sql

from commands.store import EventStore
from domain.patients import Patient
from domain.scheduling import Appointment, Clinician
from runtime import audit
from runtime.crypto import Keyring
from runtime.settings import Settings

log = structlog.get_logger("carelog.audit")

KINDS: dict[str, type] = {"patient": Patient, "appointment": Appointment, "clinician": Clinician}
PERSONAL = frozenset(
    {"name", "given_name", "family_name", "email", "address", "date_of_birth", "reason"}
)
_META = frozenset({"originator_id", "originator_version", "timestamp", "originator_topic"})


def _fields(event: Any, reveal: bool) -> str:
    shown = []
    for f in dataclasses.fields(event):
        if f.name in _META or f.name == "correlation_id":
            continue
        value = getattr(event, f.name)
        shown.append(f"{f.name}={'<redacted>' if f.name in PERSONAL and not reveal else value}")
    return " ".join(shown)


def _audited(settings: Settings, kind: str, aggregate_id: UUID, events: list[Any]) -> bool:
    """Records the disclosure before anything is revealed; False (and says why) if it cannot."""
    patients = [aggregate_id] if kind == "patient" else []
    patients += [e.patient_id for e in events if isinstance(getattr(e, "patient_id", None), UUID)]
    disclosure = audit.at_the_command_line("cli.history.reveal", patients)
    try:
        audit.record_now(settings.database_url, disclosure)
    except audit.AuditUnavailable as exc:
        print(
            f"carelog history: the audit cannot be written ({exc}): nothing is revealed",
            file=sys.stderr,
        )
        return False
    log.warning(
        "personal data revealed",
        actor=disclosure.actor,
        aggregate=kind,
        aggregate_id=str(aggregate_id),
        operation="carelog history --reveal",
        correlation_id=disclosure.correlation_id,
    )
    return True


def print_history(settings: Settings, kind: str, ident: str, reveal: bool) -> int:
    try:
        aggregate_id = UUID(ident)
    except ValueError:
        print(f"carelog history: {ident!r} is not an id", file=sys.stderr)
        return 2
    store = EventStore(settings.database_url, 1, keyring=Keyring.from_settings(settings))
    try:
        stored = store.recorder.select_events(aggregate_id)
        events: list[Any] = [store.mapper.to_domain_event(s) for s in stored]
        owner = KINDS[kind].__qualname__ + "."
        if not events or not type(events[0]).__qualname__.startswith(owner):
            print(f"carelog history: no {kind} {aggregate_id}", file=sys.stderr)
            return 1
        if reveal and not _audited(settings, kind, aggregate_id, events):
            return 1
        with psycopg.connect(settings.database_url) as conn:
            positions: dict[int, int] = dict(
                conn.execute(
                    sql.SQL(
                        "SELECT originator_version, notification_id FROM {}"
                        " WHERE originator_id = %s"
                    ).format(sql.Identifier(store.events_table)),
                    [aggregate_id],
                ).fetchall()
            )
        for event in events:
            print(
                f"v{event.originator_version:<4} @{positions.get(event.originator_version, '?'):<8}"
                f" {event.timestamp.isoformat(timespec='seconds')}"
                f" {type(event).__qualname__:<28} corr={event.correlation_id or '-'}"
                f"  {_fields(event, reveal)}"
            )
        return 0
    finally:
        store.close()
