"""Moving email claims to keyed ids: `carelog claims rekey` (also run by `carelog db migrate`).

Claims were once `uuid5` ids of the normalised email, which anyone with the source
can compute from an address. They are now an HMAC under CARELOG_CLAIM_KEY
(`domain.patients.email_claim_id`). The step that moves a store over to the key it
is given (from unkeyed claims, or from claims keyed under an earlier key):

1. takes the keyed claim of every current patient's email (one save each, the
   patient's version guarding it as any command's save does), so uniqueness holds
   under the new ids before the old ones go;
2. deletes, from the event store and its snapshots in one transaction, the rows of
   every unkeyed claim (version-5 UUIDs; keyed ids are version 8) and of every keyed
   claim that a patient holds under an id other than its email's under this key (so
   made under an earlier key). A released claim of an earlier key holds nothing and
   says nothing without that key: it stays, since a claim of this key that a patient
   just released looks the same.

Each step is idempotent, so a crash anywhere is mended by running it again. Claims
are internal aggregates, never published (`domain.contracts.envelope_for` skips
them), so their rows are no one's history; the relay and rebuilds read the store's
log by position and pass over the gaps. The command API must not run the code from
before keyed claims meanwhile: it would take unkeyed claims again (docs/replay.md).

The key's fingerprint (`key_fingerprint`) is recorded in the `claim_key` table by the
first command API to start on a store and by every rekey. A command API whose key is
not the recorded one refuses to start, and `carelog db migrate` rekeys on finding the
key changed: a wrong or new key never quietly lets an email be taken twice.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from dataclasses import dataclass
from uuid import UUID

import psycopg

from commands.service import PatientService
from commands.store import EventStore
from domain.errors import EmailTaken, PatientErased, PatientNotFound
from domain.patients import EmailClaim

_REGISTERED = "domain.patients:Patient.Registered"
_CLAIM_TOPICS = "domain.patients:EmailClaim%"
"""Topics of a claim's events (`…EmailClaim.Created`, …) and snapshots (`…EmailClaim`)."""
_UNKEYED = "substr(originator_id::text, 15, 1) = '5'"
"""A version-5 (uuid5) id: the version digit of the UUID's text."""
_KEYED = "substr(originator_id::text, 15, 1) = '8'"
_FINGERPRINT_LABEL = b"carelog email claim key"


class ClaimsNotReady(Exception):
    """The store's claims are not keyed under this key: `carelog claims rekey` first."""


def key_fingerprint(claim_key: bytes) -> str:
    """Names a claim key without telling anything of it: an HMAC of a fixed label under it."""
    return hmac.new(claim_key, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True)
class Rekeyed:
    """What a rekey did: patients looked at, claims taken, old claims' rows deleted."""

    patients: int
    taken: int
    deleted: int
    conflicts: tuple[UUID, ...] = ()
    """Current patients whose email another current patient's keyed claim holds."""


def rekey(
    store: EventStore,
    database_url: str,
    claim_key: bytes,
    progress: Callable[[int, int], None] | None = None,
) -> Rekeyed:
    """Takes every current patient's keyed claim, then deletes the old claims' rows and
    records the key; `progress(done, of)` every 1000 patients."""
    service = PatientService(store, claim_key)
    with psycopg.connect(database_url, autocommit=True) as db:
        patients = [
            row[0]
            for row in db.execute(
                "SELECT originator_id FROM carelog_events"
                " WHERE originator_version = 1 AND topic = %s ORDER BY notification_id",
                [_REGISTERED],
            )
        ]
    taken = 0
    conflicts = []
    for done, patient_id in enumerate(patients, 1):
        try:
            taken += service.keep_claim(patient_id)
        except (PatientNotFound, PatientErased):
            pass  # removed or erased: it holds no claim
        except EmailTaken:
            conflicts.append(patient_id)
        if progress is not None and (done % 1000 == 0 or done == len(patients)):
            progress(done, len(patients))
    stale = _held_under_another_key(service, database_url)
    with psycopg.connect(database_url) as db, db.transaction():
        deleted = 0
        for table in (store.events_table, "carelog_snapshots"):
            deleted += db.execute(
                f"DELETE FROM {table} WHERE topic LIKE %s"
                f" AND ({_UNKEYED} OR originator_id = ANY(%s))",
                [_CLAIM_TOPICS, stale],
            ).rowcount
        db.execute(
            "INSERT INTO claim_key (fingerprint) VALUES (%s) ON CONFLICT (singleton)"
            " DO UPDATE SET fingerprint = EXCLUDED.fingerprint, recorded_at = now()",
            [key_fingerprint(claim_key)],
        )
    return Rekeyed(len(patients), taken, deleted, tuple(conflicts))


def _held_under_another_key(service: PatientService, database_url: str) -> list[UUID]:
    """Keyed claims a patient holds whose id is not their email's under `service`'s key."""
    with psycopg.connect(database_url, autocommit=True) as db:
        keyed = [
            row[0]
            for row in db.execute(
                "SELECT originator_id FROM carelog_events"
                f" WHERE originator_version = 1 AND topic LIKE %s AND {_KEYED}",
                [_CLAIM_TOPICS],
            )
        ]
    stale = []
    for claim_id in keyed:
        claim = service.store.load(claim_id)
        if not isinstance(claim, EmailClaim) or claim.holder is None:
            continue
        try:
            email = service.get(claim.holder).email
        except (PatientNotFound, PatientErased):
            stale.append(claim_id)  # a removed (or erased) patient's claim was released
            continue
        if service.claim_id(email) != claim_id:
            stale.append(claim_id)
    return stale


def not_ready(database_url: str, claim_key: bytes) -> str | None:
    """Why the store's claims are not keyed under `claim_key` (None: they are, or there
    are none): unkeyed claims remain, or another key's fingerprint is recorded."""
    with psycopg.connect(database_url, autocommit=True) as db:
        row = db.execute(
            "SELECT EXISTS (SELECT 1 FROM carelog_events"
            f" WHERE originator_version = 1 AND topic LIKE %s AND {_UNKEYED})",
            [_CLAIM_TOPICS],
        ).fetchone()
        if row and row[0]:
            return "the event store still holds unkeyed email claims"
        row = db.execute("SELECT fingerprint FROM claim_key").fetchone()
    if row is not None and row[0] != key_fingerprint(claim_key):
        return "the email claims are keyed under another CARELOG_CLAIM_KEY"
    return None


def require_ready(database_url: str, claim_key: bytes) -> None:
    """For a command API about to start: ClaimsNotReady unless the store's claims are keyed
    under `claim_key`. A store that has recorded no key records this one."""
    reason = not_ready(database_url, claim_key)
    if reason is None:
        with psycopg.connect(database_url, autocommit=True) as db:
            db.execute(
                "INSERT INTO claim_key (fingerprint) VALUES (%s) ON CONFLICT DO NOTHING",
                [key_fingerprint(claim_key)],
            )
        reason = not_ready(database_url, claim_key)  # another key may have been first
    if reason is not None:
        raise ClaimsNotReady(reason)
