"""The disclosure audit against the real stack: every read that shows personal data leaves
a record first (actor, role, operation, patients, correlation id); a read whose record
cannot be written answers 503 and shows nothing; the table refuses every change; and
`GET /audit` pages through it."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from litestar.testing import AsyncTestClient

from domain.roles import Role
from read_api.app import create_app
from runtime import audit
from runtime.audit import Disclosure
from runtime.audit_spool import SpooledWriter, store_name
from runtime.db import open_pool
from runtime.settings import Settings, SettingsError
from tests.integration.test_appointments import Model, book, clinician, monday, patient
from tests.integration.test_dlq import carelog
from tests.integration.test_read_api import Directory
from tests.support.audit import shipped
from tests.support.patients import details
from tests.support.stack import Process, claim_key, eventually, free_port
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
    """(actor, role, operation, patient ids) of each record of one request, in order, once
    what is spooled is shipped."""
    shipped(settings)
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
    shipped(settings)
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
    async with spooled(settings) as (writer, _):
        for correlation, shown in (("new", (other, patient)), ("unrelated", (other,))):
            await writer.record(Disclosure(actor, "admin", "patient.list", shown, correlation))
    admin = tokens.headers(Role.ADMIN)
    found = await reads.get("/audit", params={"patientId": str(patient)}, headers=admin)
    assert [(r["correlationId"], r["patientIds"]) for r in found.json()["records"]] == [
        ("new", [str(other), str(patient)]),
        ("old", [str(patient)]),
    ]
    everything = await reads.get("/audit", params={"actorId": actor, "limit": 1}, headers=admin)
    assert [r["correlationId"] for r in everything.json()["records"]] == ["unrelated"]
    assert everything.json()["next"] is not None


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


async def test_a_read_is_refused_with_503_while_the_table_does_not_take_records(
    reads, directory, settings, tokens
):
    """With the table unwritable, the spool's shipment fails and reads are refused, cached
    or not, showing nothing; those answered before the failure was known are stored once
    the table is back, and reads are answered again."""
    tag = uuid.uuid4().hex[:10]
    name = f"Unaudited {tag}"
    written = directory.service.register(details(name), date(2024, 3, 1))
    await directory.catch_up()
    warm = as_user(tokens, Role.ADMIN)  # puts the patient and the page in the cache
    assert (await reads.get(f"/patients/{written.patient_id}", headers=warm)).status_code == 200
    assert (await reads.get("/patients", params={"name": tag}, headers=warm)).status_code == 200
    answered_meanwhile = []
    with audit_table_gone(settings):

        async def refused() -> bool:
            headers = as_user(tokens, Role.ADMIN)
            answer = await reads.get(f"/patients/{written.patient_id}", headers=headers)
            if answer.status_code == 200:
                answered_meanwhile.append(headers["X-Correlation-ID"])
            return answer.status_code == 503

        await eventually(refused, timeout=10, pause=0.02)
        for path, params in (
            (f"/patients/{written.patient_id}", {}),  # cached
            ("/patients", {"name": tag}),  # cached
            ("/patients", {"name": tag, "minPosition": 1}),  # read from the database
        ):
            refusal = await reads.get(path, params=params, headers=as_user(tokens, Role.ADMIN))
            assert refusal.status_code == 503, refusal.text
            assert refusal.headers["content-type"].startswith("application/problem+json")
            assert refusal.headers["retry-after"] == "1"
            assert refusal.json()["status"] == 503
            assert tag not in refusal.text and str(written.patient_id) not in refusal.text

    async def answered() -> bool:
        headers = as_user(tokens, Role.ADMIN)
        answer = await reads.get(f"/patients/{written.patient_id}", headers=headers)
        return answer.status_code == 200

    await eventually(answered, timeout=10, pause=0.05)
    for correlation in answered_meanwhile:
        assert len(recorded(settings, correlation)) == 1


async def test_a_read_is_answered_once_spooled_and_refused_when_shipping_lags_too_long(
    settings, directory, tokens, tmp_path
):
    """A record is in the spool when its answer arrives, before the table has it (here the
    table is locked); once the spool is `max_delay` behind, reads are refused, and once
    the lock goes the records are stored and reads answered again."""
    written = directory.service.register(details("Spooled First"), date(2024, 3, 1))
    await directory.catch_up()

    def writer(pool: Any, own: Settings) -> SpooledWriter:
        return SpooledWriter(pool, tmp_path, own.database_url, max_delay=0.5)

    app = create_app(settings, verifier=tokens.verifier, audit_writer=writer)
    async with AsyncTestClient(app=app) as client:
        await client.get(f"/patients/{written.patient_id}", headers=as_user(tokens, Role.ADMIN))
        with psycopg.connect(settings.database_url) as blocker:
            blocker.execute("LOCK TABLE audit.disclosures IN EXCLUSIVE MODE")
            first = as_user(tokens, Role.ADMIN)
            answer = await client.get(f"/patients/{written.patient_id}", headers=first)
            assert answer.status_code == 200
            assert spooled_in(tmp_path, first["X-Correlation-ID"])
            with psycopg.connect(settings.database_url) as other:
                assert not other.execute(
                    "SELECT 1 FROM audit.disclosures WHERE correlation_id = %s",
                    [first["X-Correlation-ID"]],
                ).fetchall()
            await asyncio.sleep(0.7)
            late = await client.get(
                f"/patients/{written.patient_id}", headers=as_user(tokens, Role.ADMIN)
            )
            assert late.status_code == 503 and "Spooled" not in late.text
        await client.get("/audit", headers=tokens.headers(Role.ADMIN))  # waits for the ship
        after = as_user(tokens, Role.ADMIN)
        assert (
            await client.get(f"/patients/{written.patient_id}", headers=after)
        ).status_code == 200
    stored = recorded(settings.with_(audit_spool_dir=str(tmp_path)), first["X-Correlation-ID"])
    assert len(stored) == 1
    assert len(recorded(settings, after["X-Correlation-ID"])) == 1
    assert list(tmp_path.glob("*.spool")) == []  # the app stopped: shipped and removed


def spooled_in(directory: Path, correlation_id: str) -> bool:
    """Whether a spool segment in `directory` holds a record of this request."""
    return any(correlation_id.encode() in p.read_bytes() for p in directory.glob("*.spool"))


@asynccontextmanager
async def spooled(
    settings: Settings, directory: Path | None = None, **options: Any
) -> AsyncIterator[tuple[SpooledWriter, Any]]:
    """A spooled writer (started) on a pool of its own, and the pool; closed after."""
    pool = await open_pool(settings.database_url, max_size=3, autocommit=True)
    where = directory or Path(settings.audit_spool_dir)
    writer = SpooledWriter(pool, where, settings.database_url, **options)
    await writer.start()
    try:
        yield writer, pool
    finally:
        await writer.close()
        await pool.close()


def stored_by(settings: Settings, actor: str) -> list[str]:
    """The correlation ids of the records of `actor`, in the order they were stored."""
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            "SELECT correlation_id FROM audit.disclosures WHERE actor = %s ORDER BY id", [actor]
        ).fetchall()
    return [c for (c,) in rows]


async def test_the_spool_stores_every_record_once_in_order_across_segments(settings, tmp_path):
    """Many callers, segments rotated as they fill: every record stored once, in the
    order appended; each segment carries a list's ids once, and is removed when shipped."""
    run = f"rotated-{uuid.uuid4()}"
    page = tuple(uuid.uuid4() for _ in range(20))
    async with spooled(settings, tmp_path, rotate_bytes=4096) as (writer, _):
        seen: list[list[bytes]] = []

        async def one(i: int) -> None:
            await asyncio.sleep(i / 2000)
            await writer.record(Disclosure(run, "admin", "patient.list", page, f"{i:04}"))
            segment = writer._own
            assert segment is not None
            seen.append(segment.path.read_bytes().splitlines())

        await asyncio.gather(*(one(i) for i in range(400)))
        assert await writer.flush()
    assert stored_by(settings, run) == [f"{i:04}" for i in range(400)]
    with_ids = [sum(b'"p":' in line for line in lines) for lines in seen]
    assert max(with_ids) == 1  # within a segment, the list's ids travel once
    assert len({len(lines) for lines in seen}) > 1 and min(len(x) for x in seen) == 1
    assert list(tmp_path.glob("*")) == []
    with psycopg.connect(settings.database_url) as conn:
        (marks,) = conn.execute(
            "SELECT count(*) FROM audit.spool_marks WHERE segment LIKE %s",
            [f"{writer.store}.%"],
        ).fetchone() or (0,)
    assert marks == 0


async def test_shipping_survives_a_connection_the_server_ended_without_refusing_reads(
    settings, tmp_path
):
    run, one = f"ended-{uuid.uuid4()}", (uuid.uuid4(),)
    async with spooled(settings, tmp_path) as (writer, pool):
        await writer.record(Disclosure(run, "admin", "patient.get", one, "1"))
        assert await writer.flush()
        with psycopg.connect(settings.database_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = '' AND pid <> pg_backend_pid()"
                " AND datname = current_database() AND state = 'idle'"
                " AND backend_type = 'client backend' AND pid = ANY(%s)",
                [[c.info.backend_pid for c in pool._pool]],
            )
        await asyncio.sleep(0.2)  # the server's goodbye reaches the pooled sockets
        for i in range(2, 6):
            await writer.record(Disclosure(run, "admin", "patient.get", one, f"{i}"))
            await asyncio.sleep(0.02)
        assert await writer.flush()
        assert not writer._failing
    assert stored_by(settings, run) == ["1", "2", "3", "4", "5"]


TORN = r"""
import resource, sys
from pathlib import Path
from uuid import UUID
from runtime.audit import AuditUnavailable, Disclosure
from runtime.audit_spool import Appender, Segment

appender = Appender(Segment.create(Path(sys.argv[1]), sys.argv[2]))
one = (UUID(sys.argv[3]),)
appender.append(Disclosure(sys.argv[4], "admin", "patient.get", one, "before"))
size = appender.segment.size()
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, hard))  # the disk is full
try:
    appender.append(Disclosure(sys.argv[4], "admin", "patient.get", one, "torn"))
except AuditUnavailable:
    print("refused")
finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
appender.append(Disclosure(sys.argv[4], "admin", "patient.get", one, "after"))
print(appender.segment.path.read_bytes().count(b"\n"))
"""


def die_after_a_torn_append(directory: Path, store: str, run: str) -> Any:
    """Runs TORN in a process of its own, which exits without shipping."""
    return subprocess.run(
        [sys.executable, "-c", TORN, str(directory), store, str(uuid.uuid4()), run],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )


async def test_an_append_that_fails_is_refused_and_a_dead_process_segment_is_adopted(
    settings, tmp_path
):
    """A process whose append was cut short by a full disk refuses that read, goes on, and
    dies without shipping: another writer adopts its segment and stores the records it
    answered, once, skipping the torn line."""
    run = f"torn-{uuid.uuid4()}"
    dead = die_after_a_torn_append(tmp_path, store_name(settings.database_url), run)
    assert dead.returncode == 0, dead.stderr
    assert dead.stdout.split()[-2:] == ["refused", "3"]  # the torn part ends in its own line
    (segment,) = tmp_path.glob("*.spool")
    async with spooled(settings, tmp_path, adopt_every=3600) as (writer, _):
        assert await writer.flush()  # asks the adopter
        assert not segment.exists()
    assert stored_by(settings, run) == ["before", "after"]


async def test_records_of_a_killed_query_api_are_all_stored_once(own_settings, tokens, tmp_path):
    """A query API process killed (SIGKILL) while it answers reads: every read it answered
    is stored once, by the next process to start on the same spool."""
    from tests.integration.test_dependency_blips import served_jwks

    spool = tmp_path / "spool"
    port = free_port()
    with psycopg.connect(own_settings.database_url) as conn:  # a page to show
        conn.execute(
            "INSERT INTO directory_patients (id, version, position, name, name_key, email,"
            " email_key, address, date_of_birth, registered_date)"
            " SELECT gen_random_uuid(), 1, g, 'Killed ' || g, 'killed ' || g,"
            " 'k' || g || '@example.org', 'k' || g || '@example.org', g || ' Kill Road',"
            " date '1950-01-01' + g, date '2024-01-02' FROM generate_series(1, 3) AS g"
        )
    settings = own_settings.with_(
        ports={**own_settings.ports, "read-api": port}, audit_spool_dir=str(spool)
    )
    with served_jwks(tokens) as jwks:
        env = {
            "CARELOG_JWKS_URL": jwks,
            "CARELOG_AUDIT_SPOOL_DIR": str(spool),
            "CARELOG_READ_API_WORKERS": "1",
        }
        api = Process(["serve", "read-api"], settings, "read-api", tmp_path / "api", env=env)
        api.start()
        answered: list[str] = []
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            async def reader(n: int) -> None:
                for _ in range(n):
                    headers = as_user(tokens, Role.ADMIN)
                    try:
                        answer = await client.get("/patients", headers=headers)
                    except httpx.HTTPError:
                        return  # killed
                    if answer.status_code == 200:
                        answered.append(headers["X-Correlation-ID"])

            readers = [asyncio.create_task(reader(10_000)) for _ in range(8)]

            async def enough() -> bool:
                return len(answered) >= 300

            await eventually(enough, timeout=60, pause=0.01)
            api.kill()
            await asyncio.gather(*readers)
        assert list(spool.glob("*.spool")), "the killed process left its segment"
        api.start()  # adopts what the killed one left
        try:
            shipped(settings)
        finally:
            api.stop()
    with psycopg.connect(settings.database_url) as conn:
        stored = [
            c for (c,) in conn.execute("SELECT correlation_id FROM audit.disclosures").fetchall()
        ]
    assert len(answered) >= 300
    assert sorted(set(stored) & set(answered)) == sorted(answered)
    assert len(stored) == len(set(stored))


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
        SpooledWriter(pool, Path("/nonexistent"), settings.database_url)


async def test_a_spool_directory_that_cannot_hold_a_file_stops_the_start(settings, tmp_path):
    (tmp_path / "a-file").write_text("")
    pool = await open_pool(settings.database_url, max_size=1, autocommit=True)
    try:
        writer = SpooledWriter(pool, tmp_path / "a-file" / "spool", settings.database_url)
        with pytest.raises(SettingsError, match=r"CARELOG_AUDIT_SPOOL_DIR=.*no spool file"):
            await writer.start()
    finally:
        await pool.close()
