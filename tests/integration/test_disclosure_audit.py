"""The disclosure audit against the real stack: every read that shows personal data leaves
a record first (actor, role, operation, patients, correlation id); a read whose record
cannot be written answers 503 and shows nothing; the table refuses every change; and
`GET /audit` pages through it."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest
from litestar.testing import AsyncTestClient

from domain.roles import Role
from read_api.app import create_app
from runtime import audit
from runtime.audit import Disclosure
from runtime.db import open_pool
from runtime.settings import Settings
from tests.integration.test_appointments import Model, book, clinician, monday, patient
from tests.integration.test_dlq import carelog
from tests.integration.test_read_api import Directory
from tests.support.patients import details
from tests.support.stack import claim_key
from tests.support.tokens import TestTokens

pytestmark = pytest.mark.integration


@pytest.fixture
async def directory(settings, store, redis) -> AsyncIterator[Directory]:
    pool = await open_pool(settings.database_url)
    yield Directory(settings, store, pool, redis)
    await pool.close()


@pytest.fixture
async def reads(settings: Settings, tokens: TestTokens) -> AsyncIterator[AsyncTestClient[Any]]:
    app = create_app(settings.with_(read_wait_seconds=0.5), verifier=tokens.verifier)
    async with AsyncTestClient(app=app) as client:
        yield client


def as_user(tokens: TestTokens, role: Role, subject: str | None = None) -> dict[str, str]:
    """Headers of a request by `subject` (a new user by default) with its own correlation
    id; the subject is echoed in `X-Test-Subject`, which the app ignores."""
    subject = subject or str(uuid.uuid4())
    return tokens.headers(role, subject) | {
        "X-Correlation-ID": f"audit-{uuid.uuid4()}",
        "X-Test-Subject": subject,
    }


def recorded(settings: Settings, correlation_id: str) -> list[tuple[Any, ...]]:
    """(actor, role, operation, patient ids) of each record of one request, in order."""
    with psycopg.connect(settings.database_url) as conn:
        return conn.execute(
            "SELECT actor, role, operation, patient_ids FROM audit.records"
            " WHERE correlation_id = %s ORDER BY id",
            [correlation_id],
        ).fetchall()


async def listed(directory: Directory) -> tuple[str, list[uuid.UUID]]:
    """Three new patients whose names share a new tag, in the read model; (tag, their ids)."""
    tag = uuid.uuid4().hex[:10]
    ids = [
        directory.service.register(details(f"Listed {tag} {i}"), date(2024, 3, 1)).patient_id
        for i in range(3)
    ]
    await directory.catch_up()
    return tag, ids


@contextmanager
def audit_table_gone(settings: Settings) -> Iterator[None]:
    """The audit's table cannot be written for a while (renamed away), then comes back."""
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE audit.disclosures RENAME TO disclosures_away")
        try:
            yield
        finally:
            conn.execute("ALTER TABLE audit.disclosures_away RENAME TO disclosures")


async def test_one_patient_read_is_recorded_before_it_is_answered_cached_or_not(
    reads, directory, settings, tokens
):
    written = directory.service.register(details("Audit One"), date(2024, 3, 1))
    await directory.catch_up()
    for _ in range(2):  # the second read is answered from the cache
        headers = as_user(tokens, Role.CLINICIAN)
        answer = await reads.get(f"/patients/{written.patient_id}", headers=headers)
        assert answer.status_code == 200 and answer.json()["name"] == "Audit One"
        assert answer.headers["x-correlation-id"] == headers["X-Correlation-ID"]
        assert recorded(settings, headers["X-Correlation-ID"]) == [
            (headers["X-Test-Subject"], "clinician", "patient.get", [written.patient_id])
        ]
    missing = as_user(tokens, Role.ADMIN)
    assert (await reads.get(f"/patients/{uuid.uuid4()}", headers=missing)).status_code == 404
    assert recorded(settings, missing["X-Correlation-ID"]) == []


async def test_a_list_page_records_the_ids_on_it_and_an_empty_page_nothing(
    reads, directory, settings, tokens
):
    tag, ids = await listed(directory)
    for _ in range(2):  # a miss, then the cached page
        headers = as_user(tokens, Role.RECEPTIONIST)
        page = await reads.get("/patients", params={"name": tag, "limit": 2}, headers=headers)
        assert page.status_code == 200
        shown = [uuid.UUID(p["id"]) for p in page.json()["patients"]]
        assert len(shown) == 2 and set(shown) <= set(ids)
        ((actor, role, operation, patients),) = recorded(settings, headers["X-Correlation-ID"])
        assert (actor, role, operation) == (
            headers["X-Test-Subject"],
            "receptionist",
            "patient.list",
        )
        assert patients == shown
    empty = as_user(tokens, Role.RECEPTIONIST)
    nothing = await reads.get("/patients", params={"name": uuid.uuid4().hex}, headers=empty)
    assert nothing.json()["patients"] == []
    assert recorded(settings, empty["X-Correlation-ID"]) == []


async def test_a_page_shown_again_and_again_stores_its_list_of_patients_once(
    reads, directory, settings, tokens
):
    tag, ids = await listed(directory)
    correlations = []
    for _ in range(3):
        headers = as_user(tokens, Role.RECEPTIONIST)
        page = await reads.get("/patients", params={"name": tag}, headers=headers)
        assert [uuid.UUID(p["id"]) for p in page.json()["patients"]] == ids
        correlations.append(headers["X-Correlation-ID"])
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT patient_ids, patient_set FROM audit.disclosures WHERE correlation_id = ANY(%s)",
            [correlations],
        ).fetchall()
        assert len(rows) == 3 and {ids_kept for ids_kept, _ in rows} == {None}
        ((digest,),) = {(digest,) for _, digest in rows}
        assert digest == audit.digest_of(tuple(ids))
        stored = conn.execute(
            "SELECT patient_ids FROM audit.patient_sets WHERE digest = %s", [digest]
        ).fetchall()
    assert stored == [(ids,)]


async def test_get_audit_finds_a_patient_in_records_of_either_form(reads, settings, tokens):
    """Records written before lists were kept apart (their own patient_ids) and after
    (a list's digest) are found, shown and paged alike."""
    patient, other = uuid.uuid4(), uuid.uuid4()
    actor = f"forms-{uuid.uuid4()}"
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO audit.disclosures (actor, role, operation, patient_ids, correlation_id)"
            " VALUES (%s, 'admin', 'patient.get', ARRAY[%s]::uuid[], 'old')",
            [actor, patient],
        )
    pool = await open_pool(settings.database_url, autocommit=True)
    try:
        writer = audit.GroupedWriter(pool)
        for correlation, shown in (("new", (other, patient)), ("unrelated", (other,))):
            await writer.record(Disclosure(actor, "admin", "patient.list", shown, correlation))
    finally:
        await pool.close()
    admin = tokens.headers(Role.ADMIN)
    found = await reads.get("/audit", params={"patientId": str(patient)}, headers=admin)
    assert [(r["correlationId"], r["patientIds"]) for r in found.json()["records"]] == [
        ("new", [str(other), str(patient)]),
        ("old", [str(patient)]),
    ]
    everything = await reads.get("/audit", params={"actorId": actor, "limit": 1}, headers=admin)
    assert [r["correlationId"] for r in everything.json()["records"]] == ["unrelated"]
    assert everything.json()["next"] is not None


def test_a_connection_sends_a_list_until_it_has_stored_it_and_each_list_once():
    first, second = uuid.uuid4(), uuid.uuid4()
    batch = [
        Disclosure("a", "admin", "patient.list", (first, second), "c1"),
        Disclosure("b", "admin", "patient.list", (first, second), "c2"),
        Disclosure("c", "admin", "patient.get", (first,), "c3"),
    ]
    both, one = audit.digest_of((first, second)), audit.digest_of((first,))
    known = audit._Known()
    statement, params, lists = audit._statement(batch, known)
    assert b"audit.patient_sets" in statement and lists == [both, one]
    assert json.loads(params[0]) == [
        {"d": both.hex(), "p": [str(first), str(second)]},
        {"d": one.hex(), "p": [str(first)]},
    ]
    assert audit._statement(batch, known)[2] == lists  # not stored yet: sent again
    known.stored(lists)
    statement, params, lists = audit._statement(batch, known)
    assert b"audit.patient_sets" not in statement and lists == []
    assert [(r["a"], r["d"], r["c"]) for r in json.loads(params[0])] == [
        ("a", both.hex(), "c1"),
        ("b", both.hex(), "c2"),
        ("c", one.hex(), "c3"),
    ]
    assert audit._statement(batch, audit._Known())[2] != []  # another connection knows none


@pytest.fixture
async def writes(settings, store, tokens) -> AsyncIterator[AsyncTestClient[Any]]:
    from commands.api import create_app as commands_app

    async with AsyncTestClient(app=commands_app(settings, store, tokens.verifier)) as client:
        client.headers.update(tokens.headers(Role.ADMIN))
        yield client


async def test_appointment_reads_that_show_a_reason_are_recorded(
    reads, writes, settings, store, tokens
):
    doctor, person = await clinician(writes), await patient(writes)
    booked = await book(writes, person, doctor, monday(5, hour=9))
    assert booked.status_code == 201, booked.text
    appointment = booked.json()["id"]
    await Model(settings, store).catch_up()

    seen = as_user(tokens, Role.RECEPTIONIST)
    one = await reads.get(f"/appointments/{appointment}", headers=seen)
    assert one.json()["reason"] == "annual check-up"
    assert recorded(settings, seen["X-Correlation-ID"]) == [
        (seen["X-Test-Subject"], "receptionist", "appointment.get", [uuid.UUID(person)])
    ]
    listed = as_user(tokens, Role.ADMIN)
    page = await reads.get("/appointments", params={"clinicianId": doctor}, headers=listed)
    assert [a["reason"] for a in page.json()["appointments"]] == ["annual check-up"]
    assert recorded(settings, listed["X-Correlation-ID"]) == [
        (listed["X-Test-Subject"], "admin", "appointment.list", [uuid.UUID(person)])
    ]
    # A role that reads no reasons is shown no personal data: nothing to record.
    withheld = as_user(tokens, Role.ANALYST)
    hidden = await reads.get(f"/appointments/{appointment}", headers=withheld)
    assert hidden.status_code == 200 and hidden.json()["reason"] is None
    assert recorded(settings, withheld["X-Correlation-ID"]) == []


async def test_concurrent_reads_are_each_recorded_once(reads, directory, settings, tokens):
    written = directory.service.register(details("Many Readers"), date(2024, 3, 1))
    await directory.catch_up()
    requests = [as_user(tokens, Role.ADMIN) for _ in range(40)]
    answers = await asyncio.gather(
        *(reads.get(f"/patients/{written.patient_id}", headers=h) for h in requests)
    )
    assert [a.status_code for a in answers] == [200] * 40
    for headers in requests:
        assert recorded(settings, headers["X-Correlation-ID"]) == [
            (headers["X-Test-Subject"], "admin", "patient.get", [written.patient_id])
        ]


async def test_the_writer_stores_every_record_of_staggered_concurrent_callers(settings):
    import random

    run = f"writer-{uuid.uuid4()}"
    rng = random.Random(14)
    pool = await open_pool(settings.database_url, max_size=2, autocommit=True)
    writer = audit.GroupedWriter(pool, parallel=2)

    async def one(i: int) -> None:
        await asyncio.sleep(rng.random() / 50)  # arrivals spread over the INSERTs in flight
        await writer.record(audit.Disclosure(run, "admin", "patient.get", (uuid.uuid4(),), f"{i}"))

    try:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(400))), 120)
    finally:
        await pool.close()
    with psycopg.connect(settings.database_url) as conn:
        stored = conn.execute(
            "SELECT correlation_id FROM audit.disclosures WHERE actor = %s", [run]
        ).fetchall()
    assert sorted(int(c) for (c,) in stored) == list(range(400))


def stored_by(settings: Settings, actor: str) -> list[str]:
    """The correlation ids of the records of `actor`, sorted."""
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT correlation_id FROM audit.disclosures WHERE actor = %s", [actor]
        ).fetchall()
    return sorted(c for (c,) in rows)


@asynccontextmanager
async def one_at_a_time(settings: Settings) -> AsyncIterator[tuple[audit.GroupedWriter, Any]]:
    """A writer of one INSERT at a time on a pool of its own, and the pool."""
    pool = await open_pool(settings.database_url, max_size=3, autocommit=True)
    writer = audit.GroupedWriter(pool, parallel=1)
    try:
        yield writer, pool
    finally:
        await writer.close()
        await pool.close()


async def test_the_writer_keeps_its_connection_and_replaces_one_the_server_ended(settings):
    """Between INSERTs the writer holds its connection; one the server has ended since (a
    restart, a terminated backend) is swapped for another before use: no record fails."""
    run, one = f"held-{uuid.uuid4()}", (uuid.uuid4(),)
    async with one_at_a_time(settings) as (writer, pool):
        await writer.record(Disclosure(run, "admin", "patient.get", one, "1"))
        (line,) = writer._lines
        backend = line.conn.info.backend_pid
        await writer.record(Disclosure(run, "admin", "patient.get", one, "2"))
        assert [held.conn.info.backend_pid for held in writer._lines] == [backend]
        with psycopg.connect(settings.database_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [backend])
        await asyncio.sleep(0.2)  # the server's goodbye reaches the held socket
        await writer.record(Disclosure(run, "admin", "patient.get", one, "3"))
        assert [held.conn.info.backend_pid for held in writer._lines] != [backend]
        await writer.close()
        assert writer._lines == [] and pool.get_stats()["pool_available"] >= 1
    assert stored_by(settings, run) == ["1", "2", "3"]


async def test_a_request_cancelled_mid_insert_leaves_no_other_record_unwritten(settings):
    """A request writing an INSERT is cancelled while it waits on the server (the app
    stopping, say): the records that were waiting are written by the next INSERT, those
    in the cancelled one's batch too, and none of their requests hangs or fails."""
    run, one = f"cancelled-{uuid.uuid4()}", (uuid.uuid4(),)
    async with one_at_a_time(settings) as (writer, _):
        await writer.record(Disclosure(run, "admin", "patient.get", one, "warm"))
        with psycopg.connect(settings.database_url) as blocker:
            # The INSERTs wait on this lock until it is let go.
            blocker.execute("LOCK TABLE audit.disclosures IN EXCLUSIVE MODE")
            leader = asyncio.create_task(
                writer.record(Disclosure(run, "admin", "patient.get", one, "leader"))
            )
            await asyncio.sleep(0.2)
            waiting = [
                asyncio.create_task(
                    writer.record(Disclosure(run, "admin", "patient.get", one, f"w{i}"))
                )
                for i in range(5)
            ]
            await asyncio.sleep(0.2)
            assert not any(t.done() for t in [leader, *waiting])
            leader.cancel()  # its own record alone in its INSERT
            await asyncio.sleep(0.2)
            # The first waiting request was given the turn: its INSERT holds every
            # record waiting, and waits on the lock in turn.
            promoted, rest = waiting[0], waiting[1:]
            assert not promoted.done()
            promoted.cancel()
            await asyncio.sleep(0.2)
            blocker.rollback()
        await asyncio.wait_for(asyncio.gather(*rest), 30)
        for cancelled in (leader, promoted):
            with pytest.raises(asyncio.CancelledError):
                await cancelled
    stored = stored_by(settings, run)
    assert [c for c in stored if c not in ("leader", "w0")] == ["w1", "w2", "w3", "w4", "warm"]


async def test_a_read_whose_record_cannot_be_written_is_503_and_shows_nothing(
    reads, directory, settings, tokens
):
    tag = uuid.uuid4().hex[:10]
    name = f"Unaudited {tag}"
    written = directory.service.register(details(name), date(2024, 3, 1))
    await directory.catch_up()
    warm = as_user(tokens, Role.ADMIN)  # puts the patient and the page in the cache
    assert (await reads.get(f"/patients/{written.patient_id}", headers=warm)).status_code == 200
    assert (await reads.get("/patients", params={"name": tag}, headers=warm)).status_code == 200
    with audit_table_gone(settings):
        for path, params in (
            (f"/patients/{written.patient_id}", {}),  # cached
            ("/patients", {"name": tag}),  # cached
            ("/patients", {"name": tag, "minPosition": 1}),  # read from the database
        ):
            refused = await reads.get(path, params=params, headers=as_user(tokens, Role.ADMIN))
            assert refused.status_code == 503, refused.text
            assert refused.headers["content-type"].startswith("application/problem+json")
            assert refused.headers["retry-after"] == "1"
            assert refused.json()["status"] == 503
            assert tag not in refused.text and str(written.patient_id) not in refused.text
    after = as_user(tokens, Role.ADMIN)
    assert (await reads.get(f"/patients/{written.patient_id}", headers=after)).status_code == 200
    assert len(recorded(settings, after["X-Correlation-ID"])) == 1


def refuses_changes(
    conn: psycopg.Connection[Any], table: str, assignment: str, key: str, value: Any
) -> None:
    """UPDATE (with `assignment`) and DELETE of the row whose `key` is `value`, and
    TRUNCATE, are each refused as changes to an append-only table."""
    for change in (
        f"UPDATE {table} SET {assignment} WHERE {key} = %s",
        f"DELETE FROM {table} WHERE {key} = %s",
        f"TRUNCATE {table}",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"):
            conn.execute(change, [value] if "%s" in change else None)


def test_the_audit_tables_refuse_update_delete_and_truncate(settings):
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        (row_id,) = conn.execute(
            "INSERT INTO audit.disclosures (actor, role, operation, patient_ids, correlation_id)"
            " VALUES ('someone', 'admin', 'patient.get', ARRAY[%s]::uuid[], 'c') RETURNING id",
            [uuid.uuid4()],
        ).fetchone()
        refuses_changes(conn, "audit.disclosures", "actor = 'someone else'", "id", row_id)
        still = conn.execute("SELECT actor FROM audit.disclosures WHERE id = %s", [row_id])
        assert still.fetchone() == ("someone",)
        digest = bytes(32)
        conn.execute(
            "INSERT INTO audit.patient_sets (digest, patient_ids) VALUES (%s, '{}')"
            " ON CONFLICT DO NOTHING",
            [digest],
        )
        refuses_changes(conn, "audit.patient_sets", "patient_ids = '{}'", "digest", digest)


async def test_get_audit_filters_and_pages_newest_first(reads, directory, settings, tokens):
    written = directory.service.register(details("Paged Audit"), date(2024, 3, 1))
    await directory.catch_up()
    reader = str(uuid.uuid4())
    correlations = []
    for _ in range(5):
        headers = as_user(tokens, Role.CLINICIAN, reader)
        correlations.append(headers["X-Correlation-ID"])
        assert (
            await reads.get(f"/patients/{written.patient_id}", headers=headers)
        ).status_code == 200
    admin = tokens.headers(Role.ADMIN)
    seen, cursor, pages = [], None, 0
    while True:
        params: dict[str, Any] = {"patientId": str(written.patient_id), "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = await reads.get("/audit", params=params, headers=admin)
        assert page.status_code == 200, page.text
        pages += 1
        seen += page.json()["records"]
        cursor = page.json()["next"]
        if cursor is None:
            break
    assert pages == 3
    assert [r["correlationId"] for r in seen] == correlations[::-1]
    assert {(r["actorId"], r["role"], r["operation"]) for r in seen} == {
        (reader, "clinician", "patient.get")
    }
    assert all(r["patientIds"] == [str(written.patient_id)] for r in seen)

    by_actor = await reads.get("/audit", params={"actorId": reader}, headers=admin)
    assert len(by_actor.json()["records"]) == 5
    first = datetime.fromisoformat(seen[-1]["at"])
    window = {"actorId": reader, "from": first.isoformat(), "to": first.isoformat()}
    assert (await reads.get("/audit", params=window, headers=admin)).status_code == 400
    later = {"actorId": reader, "from": (first + timedelta(days=1)).isoformat()}
    assert (await reads.get("/audit", params=later, headers=admin)).json()["records"] == []
    earlier = {"actorId": reader, "to": (first - timedelta(days=1)).isoformat()}
    assert (await reads.get("/audit", params=earlier, headers=admin)).json()["records"] == []
    around = {
        "actorId": reader,
        "from": (first - timedelta(minutes=5)).isoformat(),
        "to": (datetime.now(UTC) + timedelta(minutes=5)).isoformat(),
    }
    assert len((await reads.get("/audit", params=around, headers=admin)).json()["records"]) == 5


async def test_get_audit_names_every_bad_parameter_and_is_for_admins_only(reads, tokens):
    bad = await reads.get(
        "/audit",
        params={
            "patientId": "not-a-uuid",
            "from": "2024-01-01T00:00:00",
            "limit": "0",
            "cursor": "nonsense",
            "colour": "blue",
        },
        headers=tokens.headers(Role.ADMIN),
    )
    assert bad.status_code == 400
    # Type errors and rule errors (the cursor, a time without offset) in one answer.
    assert set(bad.json()["errors"]) == {"patientId", "limit", "colour", "from", "cursor"}
    semantic = await reads.get(
        "/audit",
        params={"from": "2024-01-01T00:00:00", "to": "2023-01-01T00:00:00Z", "cursor": "x"},
        headers=tokens.headers(Role.ADMIN),
    )
    assert semantic.status_code == 400
    assert set(semantic.json()["errors"]) == {"from", "cursor"}
    for role in (Role.CLINICIAN, Role.RECEPTIONIST, Role.BILLING, Role.ANALYST):
        assert (await reads.get("/audit", headers=tokens.headers(role))).status_code == 403
    assert (await reads.get("/audit")).status_code == 401


def test_revealing_at_the_command_line_is_recorded_first_or_not_at_all(own_settings, own_store):
    from commands.service import PatientService

    written = PatientService(own_store, claim_key()).register(
        details("Revealed Person"), date(2024, 1, 2)
    )
    patient_id = str(written.patient_id)
    with audit_table_gone(own_settings):
        refused = carelog(own_settings, "history", "patient", patient_id, "--reveal")
    assert refused.returncode == 1
    assert "Revealed" not in refused.stdout and "audit cannot be written" in refused.stderr
    revealed = carelog(own_settings, "history", "patient", patient_id, "--reveal")
    assert revealed.returncode == 0 and "Revealed Person" in revealed.stdout
    with psycopg.connect(own_settings.database_url) as conn:
        rows = conn.execute(
            "SELECT actor, role, operation, patient_ids FROM audit.records"
        ).fetchall()
    ((actor, role, operation, patients),) = rows
    assert actor.startswith("os:") and role == "operator"
    assert (operation, patients) == ("cli.history.reveal", [written.patient_id])


def test_the_writer_refuses_a_pool_whose_statements_wait_for_a_commit(settings):
    import psycopg_pool

    pool = psycopg_pool.AsyncConnectionPool(settings.database_url, open=False)
    with pytest.raises(ValueError, match="autocommit"):
        audit.GroupedWriter(pool)
