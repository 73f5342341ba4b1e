"""Moving a store's email claims from unkeyed uuid5 ids to keyed ids (`carelog claims rekey`)."""

from __future__ import annotations

from datetime import date
from uuid import UUID

import psycopg
import pytest
from litestar.testing import AsyncTestClient

from commands.api import create_app
from commands.claims import ClaimsNotReady, key_fingerprint, require_ready
from commands.store import EventStore
from domain.patients import EmailClaim, Patient, email_claim_id, unkeyed_email_claim_id
from domain.roles import Role
from runtime.settings import Settings
from tests.integration.test_dlq import carelog
from tests.support.patients import body, details
from tests.support.stack import claim_key
from tests.support.tokens import TestTokens

pytestmark = pytest.mark.integration


def seed_unkeyed(store: EventStore, email: str, removed: bool = False) -> Patient:
    """A patient registered by the code from before keyed claims: its claim is a uuid5."""
    patient = Patient.register(details(email=email), date(2024, 1, 2))
    claim = EmailClaim.take(unkeyed_email_claim_id(email), patient.id)
    if removed:
        patient.remove()
        claim.release(patient.id)
    store.save(patient, claim)
    return patient


def claim_ids(settings: Settings) -> set[UUID]:
    with psycopg.connect(settings.database_url) as db:
        rows = db.execute(
            "SELECT originator_id FROM carelog_events"
            " WHERE topic LIKE 'domain.patients:EmailClaim.%'"
            " UNION SELECT originator_id FROM carelog_snapshots"
            " WHERE topic LIKE 'domain.patients:EmailClaim%'"
        ).fetchall()
    return {row[0] for row in rows}


def recorded(settings: Settings) -> str | None:
    """The fingerprint of the key the store's claims are recorded as keyed under."""
    with psycopg.connect(settings.database_url) as db:
        row = db.execute("SELECT fingerprint FROM claim_key").fetchone()
    return None if row is None else str(row[0])


async def test_rekey_moves_unkeyed_claims_and_uniqueness_still_holds(
    own_settings: Settings, own_store: EventStore, tokens: TestTokens
):
    settings, store = own_settings, own_store
    held = body()["email"]
    freed = body()["email"]
    holder = seed_unkeyed(store, held)
    seed_unkeyed(store, freed, removed=True)
    unkeyed = {unkeyed_email_claim_id(held), unkeyed_email_claim_id(freed)}
    assert claim_ids(settings) == unkeyed

    first = carelog(settings, "claims", "rekey")
    assert first.returncode == 0, first.stdout + first.stderr
    # Three rows: the held email's claim, and the freed one's (taken, then released).
    assert "2 patient(s) looked at, 1 keyed claim(s) taken, 3 old claim row(s)" in first.stdout
    assert held not in first.stdout + first.stderr
    assert recorded(settings) == key_fingerprint(claim_key())
    # Again: nothing left to do, and no harm done; `carelog db migrate` finds nothing to do.
    again = carelog(settings, "claims", "rekey")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 keyed claim(s) taken, 0 old claim row(s) deleted" in again.stdout
    migrated = carelog(settings, "db", "migrate")
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert "claims: keyed under CARELOG_CLAIM_KEY" in migrated.stdout

    # Only the keyed claim of the current patient's email is left.
    assert claim_ids(settings) == {email_claim_id(held, claim_key())}

    app = create_app(settings, store, verifier=tokens.verifier)
    async with AsyncTestClient(app=app) as client:
        client.headers.update(tokens.headers(Role.ADMIN))
        taken = await client.post("/patients", json=body(email=held.upper()))
        assert taken.status_code == 409, taken.text
        reused = await client.post("/patients", json=body(email=freed))
        assert reused.status_code == 201, reused.text
        removed = await client.delete(f"/patients/{holder.id}")
        assert removed.status_code == 204, removed.text
        after = await client.post("/patients", json=body(email=held))
        assert after.status_code == 201, after.text
    assert not claim_ids(settings) & unkeyed


async def test_carelog_db_migrate_rekeys_a_store_with_unkeyed_claims(
    own_settings: Settings, own_store: EventStore
):
    email = body()["email"]
    seed_unkeyed(own_store, email)
    migrated = carelog(own_settings, "db", "migrate")
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    assert "1 keyed claim(s) taken, 1 old claim row(s) deleted" in migrated.stdout
    assert claim_ids(own_settings) == {email_claim_id(email, claim_key())}


async def test_the_command_api_refuses_to_start_while_unkeyed_claims_remain(
    own_settings: Settings, own_store: EventStore
):
    seed_unkeyed(own_store, body()["email"])
    refused = carelog(own_settings, "serve", "commands")
    assert refused.returncode != 0
    assert "unkeyed email claims" in refused.stderr
    assert "carelog claims rekey" in refused.stderr


async def test_the_first_key_to_start_on_a_store_is_recorded_and_another_is_refused(
    own_settings: Settings,
):
    first, other = b"f" * 32, b"o" * 32
    assert recorded(own_settings) is None
    require_ready(own_settings.database_url, first)
    assert recorded(own_settings) == key_fingerprint(first)
    require_ready(own_settings.database_url, first)  # the same key again: still ready
    with pytest.raises(ClaimsNotReady, match="another CARELOG_CLAIM_KEY"):
        require_ready(own_settings.database_url, other)
    assert recorded(own_settings) == key_fingerprint(first)
    # The fingerprint tells nothing of the key.
    assert first.decode() not in key_fingerprint(first)


async def test_a_new_key_is_refused_until_migrate_rekeys_the_claims_of_the_old_one(
    own_settings: Settings, own_store: EventStore, tokens: TestTokens
):
    old, new = "o" * 32 + "-old-claim-key", "n" * 32 + "-new-claim-key"
    email, later = body()["email"], body()["email"]
    app = create_app(own_settings.with_(claim_key=old), own_store, verifier=tokens.verifier)
    async with AsyncTestClient(app=app) as client:
        client.headers.update(tokens.headers(Role.ADMIN))
        kept = await client.post("/patients", json=body(email=email))
        assert kept.status_code == 201, kept.text
        moved = await client.post("/patients", json=body())
        assert moved.status_code == 201, moved.text
        changed = await client.put(f"/patients/{moved.json()['id']}", json=body(email=later))
        assert changed.status_code == 200, changed.text
    before = claim_ids(own_settings)
    assert email_claim_id(email, old.encode()) in before

    recorded_old = carelog(own_settings.with_(claim_key=old), "claims", "rekey")
    assert recorded_old.returncode == 0, recorded_old.stdout + recorded_old.stderr
    assert recorded(own_settings) == key_fingerprint(old.encode())

    rotated = own_settings.with_(claim_key=new)
    refused = carelog(rotated, "serve", "commands")
    assert refused.returncode != 0
    assert "another CARELOG_CLAIM_KEY" in refused.stderr
    done = carelog(rotated, "db", "migrate")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "keyed under another CARELOG_CLAIM_KEY: rekeying" in done.stdout
    assert "2 keyed claim(s) taken, 2 old claim row(s) deleted" in done.stdout
    assert recorded(own_settings) == key_fingerprint(new.encode())
    after = claim_ids(own_settings)
    assert email_claim_id(email, old.encode()) not in after
    assert email_claim_id(later, old.encode()) not in after
    assert {email_claim_id(email, new.encode()), email_claim_id(later, new.encode())} <= after

    app = create_app(rotated, own_store, verifier=tokens.verifier)
    async with AsyncTestClient(app=app) as client:
        client.headers.update(tokens.headers(Role.ADMIN))
        taken = await client.post("/patients", json=body(email=email))
        assert taken.status_code == 409, taken.text


async def test_rekeying_reads_sealed_emails_and_skips_erased_patients(
    own_settings: Settings, own_store: EventStore, tokens: TestTokens
):
    old, new = "o" * 32 + "-old-claim-key", "n" * 32 + "-new-claim-key"
    kept_email, erased_email = body()["email"], body()["email"]
    app = create_app(own_settings.with_(claim_key=old), own_store, verifier=tokens.verifier)
    async with AsyncTestClient(app=app) as client:
        client.headers.update(tokens.headers(Role.ADMIN))
        assert (await client.post("/patients", json=body(email=kept_email))).status_code == 201
        erased = await client.post("/patients", json=body(email=erased_email))
        assert erased.status_code == 201, erased.text
        gone = await client.post(
            f"/patients/{erased.json()['id']}/erase", json={"reason": "request 17"}
        )
        assert gone.status_code == 200, gone.text
    assert carelog(own_settings.with_(claim_key=old), "claims", "rekey").returncode == 0

    rotated = own_settings.with_(claim_key=new)
    done = carelog(rotated, "db", "migrate")
    assert done.returncode == 0, done.stdout + done.stderr
    # The kept patient's claim is keyed over their email as registered, not its sealed form.
    assert email_claim_id(kept_email, new.encode()) in claim_ids(own_settings)
    assert email_claim_id(erased_email, new.encode()) not in claim_ids(own_settings)
    app = create_app(rotated, own_store, verifier=tokens.verifier)
    async with AsyncTestClient(app=app) as client:
        client.headers.update(tokens.headers(Role.ADMIN))
        assert (await client.post("/patients", json=body(email=kept_email))).status_code == 409
        assert (await client.post("/patients", json=body(email=erased_email))).status_code == 201
