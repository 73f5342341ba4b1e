"""Crypto-shredding: personal fields are sealed in the store and on the way to Kafka, and
erasing a patient destroys their key (real PostgreSQL)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, date, datetime
from typing import Any

import msgspec
import psycopg
import pytest
from eventsourcing.domain import Snapshot
from eventsourcing.persistence import IntegrityError
from faststream.kafka import KafkaBroker
from litestar.testing import AsyncTestClient

from commands.api import create_app
from commands.relay import EventStoreLog
from commands.store import EventStore
from domain import contracts
from domain.patients import Patient
from domain.privacy import PATIENT_DETAILS, is_sealed
from domain.roles import Role
from runtime.consumers import Batch, EventBatchWorker
from runtime.crypto import Keyring, UnreadableToken, open_payload
from runtime.settings import Settings
from tests.support.tokens import TestTokens

pytestmark = pytest.mark.integration


def marked() -> tuple[str, dict[str, Any]]:
    """A unique marker and a registration whose every personal field carries it."""
    mark = uuid.uuid4().hex[:12]
    return mark, {
        "name": f"Ada Mk{mark} Lovelace",
        "email": f"ada-{mark}@example.org",
        "address": f"{mark} St James's Square",
        "dateOfBirth": "1990-12-10",
        "registeredDate": "2024-01-02",
    }


@pytest.fixture
async def client(
    settings: Settings, store: EventStore, tokens: TestTokens
) -> AsyncIterator[AsyncTestClient[Any]]:
    app = create_app(settings, store, verifier=tokens.verifier)
    async with AsyncTestClient(app=app) as test_client:
        test_client.headers.update(tokens.headers(Role.ADMIN, subject="admin-erasing"))
        yield test_client


@pytest.fixture
def keyrings(settings: Settings) -> Iterator[tuple[Keyring, Keyring]]:
    """Two processes' keyrings on one store: a writer's and a reader's."""
    writer, reader = Keyring.from_settings(settings), Keyring.from_settings(settings)
    yield writer, reader
    writer.close()
    reader.close()


def stored_text(settings: Settings, table: str, patient_id: str) -> str:
    with psycopg.connect(settings.database_url) as conn:
        rows = conn.execute(
            f"SELECT topic, convert_from(state, 'UTF8') FROM {table}"
            " WHERE originator_id = %s ORDER BY originator_version",
            [patient_id],
        ).fetchall()
    return "\n".join(f"{topic} {state}" for topic, state in rows)


def test_a_sealed_value_opens_only_for_its_subject_and_field(keyring: Keyring):
    ada, grace = uuid.uuid4(), uuid.uuid4()
    token = keyring.seal(ada, "name", "Ada Lovelace")
    assert is_sealed(token) and "Ada" not in token
    assert keyring.open(token, "name") == "Ada Lovelace"
    with pytest.raises(UnreadableToken):
        keyring.open(token, "email")  # moved to another field
    moved = token.replace(str(ada), str(grace))
    keyring.seal(grace, "name", "Grace Hopper")
    with pytest.raises(UnreadableToken):
        keyring.open(moved, "name")  # moved to another patient
    assert keyring.open("stored before sealing", "name") == "stored before sealing"


def test_concurrent_first_seals_of_one_subject_agree_on_one_key(settings: Settings):
    subject = uuid.uuid4()
    rings = [Keyring.from_settings(settings) for _ in range(6)]
    tokens: list[str] = []
    barrier = threading.Barrier(len(rings))

    def seal(ring: Keyring) -> None:
        barrier.wait()
        tokens.append(ring.seal(subject, "name", "Ada"))

    threads = [threading.Thread(target=seal, args=(ring,)) for ring in rings]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        fresh = Keyring.from_settings(settings)
        assert [fresh.open(t, "name") for t in tokens] == ["Ada"] * len(rings)
        fresh.close()
    finally:
        for ring in rings:
            ring.close()


def test_destroying_a_key_reaches_a_process_that_holds_it(keyrings: tuple[Keyring, Keyring]):
    subject = uuid.uuid4()
    writer, reader = keyrings
    reader.listen()
    token = writer.seal(subject, "email", "a@example.org")
    assert reader.open(token, "email") == "a@example.org"  # now cached by the reader
    writer.destroy(subject)
    assert writer.open(token, "email") is None
    deadline = threading.Event()
    for _ in range(100):
        if reader.open(token, "email") is None:
            break
        deadline.wait(0.05)
    assert reader.open(token, "email") is None
    with pytest.raises(Exception, match="erased"):
        writer.seal(subject, "email", "b@example.org")


async def test_personal_fields_are_sealed_in_the_store_snapshots_and_what_is_published(
    client, settings: Settings, store: EventStore
):
    mark, body = marked()
    response = await client.post("/patients", json=body)
    assert response.status_code == 201, response.text
    assert response.json()["name"] == body["name"]  # the aggregate holds them in the clear
    patient_id = response.json()["id"]
    changed = await client.put(f"/patients/{patient_id}", json=body | {"address": f"{mark} Rd"})
    assert changed.status_code == 200, changed.text
    patient = store.repository.get(uuid.UUID(patient_id))
    store.snapshots.put([Patient.Snapshot.take(patient)])  # type: ignore[union-attr]

    events = stored_text(settings, "carelog_events", patient_id)
    snapshots = stored_text(settings, "carelog_snapshots", patient_id)
    assert "Patient.Registered" in events and "Patient.DetailsChanged" in events
    assert "sealed:v1:" in events and "sealed:v1:" in snapshots
    assert mark not in events and "1990-12-10" not in events
    assert mark not in snapshots

    source = EventStoreLog(store, settings.database_url)
    source.position = int(response.headers["event-position"]) - 1
    published = [o.envelope for o in (await source.read(50)).events]
    mine = [e for e in published if str(e.aggregate_id) == patient_id]
    assert [e.type for e in mine] == ["PatientRegistered", "PatientDetailsChanged"]
    for envelope in mine:
        assert mark not in str(envelope.data)
        assert is_sealed(envelope.data.email) and is_sealed(envelope.data.date_of_birth)
    opened = open_payload(store.keyring, mine[0].data)
    assert isinstance(opened, contracts.PatientRegisteredV2)
    assert (opened.name, opened.email) == (body["name"], body["email"])
    assert opened.date_of_birth.isoformat() == "1990-12-10"


async def test_erasing_answers_410_afterwards_and_keeps_the_history(
    client, settings: Settings, store: EventStore
):
    _, body = marked()
    registered = await client.post("/patients", json=body)
    patient_id = registered.json()["id"]
    source = EventStoreLog(store, settings.database_url)
    source.position = int(registered.headers["event-position"]) - 1
    sealed = next(o.envelope for o in (await source.read(5)).events)
    changed = await client.put(f"/patients/{patient_id}", json={**body, "name": "Changed Name"})
    assert changed.status_code == 200, changed.text

    erased = await client.post(f"/patients/{patient_id}/erase", json={"reason": "request R-1"})
    assert erased.status_code == 200, erased.text
    assert erased.json() == {
        "id": patient_id,
        "erased": True,
        "version": 3,
        "position": erased.json()["position"],
    }
    for method, path, payload in [
        ("PUT", f"/patients/{patient_id}", body),
        ("DELETE", f"/patients/{patient_id}", None),
        ("PUT", f"/patients/{patient_id}/preferences", {"reminders": False}),
        ("POST", f"/patients/{patient_id}/erase", {"reason": "again"}),
    ]:
        answer = await client.request(method, path, json=payload)
        assert answer.status_code == 410, (method, path, answer.text)
        assert answer.json()["detail"] == "the patient was erased"

    # The email is free again, and the history stays: ids, types, times.
    again = await client.post("/patients", json=body)
    assert again.status_code == 201, again.text
    with psycopg.connect(settings.database_url) as conn:
        kinds = [
            r[0]
            for r in conn.execute(
                "SELECT topic FROM carelog_events WHERE originator_id = %s"
                " ORDER BY originator_version",
                [patient_id],
            )
        ]
    assert [k.rsplit(".", 1)[1] for k in kinds] == ["Registered", "DetailsChanged", "Erased"]
    erasure = stored_text(settings, "carelog_events", patient_id)
    assert "request R-1" in erasure and "admin-erasing" in erasure

    # A store (a rebuild, another process) opens nothing of theirs any more.
    ring = Keyring.from_settings(settings)
    fresh = EventStore(settings.database_url, keyring=ring)
    try:
        again_read = fresh.repository.get(uuid.UUID(patient_id))
        assert again_read.erased and again_read.name is None and again_read.email is None
        assert again_read.given_name is None and again_read.family_name is None
        first = fresh.mapper.to_domain_event(fresh.recorder.select_events(uuid.UUID(patient_id))[0])
        assert first.name is None and first.date_of_birth is None
        assert isinstance(open_payload(ring, sealed.data), contracts.Unreadable)
    finally:
        fresh.close()
        ring.close()


async def test_an_erasure_needs_a_reason_and_the_admin_role(client, tokens: TestTokens):
    _, body = marked()
    patient_id = (await client.post("/patients", json=body)).json()["id"]
    for bad, error in [
        ({}, "is required"),
        ({"reason": " "}, "must not be blank"),
        ({"reason": "x" * 201}, "at most 200"),
    ]:
        answer = await client.post(f"/patients/{patient_id}/erase", json=bad)
        assert answer.status_code == 400, answer.text
        assert error in answer.json()["errors"]["reason"]
    denied = await client.post(
        f"/patients/{patient_id}/erase",
        json={"reason": "r"},
        headers=tokens.headers(Role.CLINICIAN),
    )
    assert denied.status_code == 403
    unknown = await client.post(f"/patients/{uuid.uuid4()}/erase", json={"reason": "r"})
    assert unknown.status_code == 404


def test_a_snapshot_of_an_erased_patient_holds_nothing_readable(store: EventStore):
    from datetime import date

    from domain.patients import PatientDetails

    patient = Patient.register(
        PatientDetails("Snap Shot", "snap@example.org", "1 Lens St", date(1980, 1, 1)),
        date(2024, 1, 1),
    )
    store.save(patient)
    snapshot = Patient.Snapshot.take(patient)
    store.snapshots.put([snapshot])  # type: ignore[union-attr]
    assert store.keyring is not None
    store.keyring.destroy(patient.id)
    stored = store.snapshots.recorder.select_events(patient.id, desc=True, limit=1)  # type: ignore[union-attr]
    again = store.mapper.to_domain_event(stored[0])
    assert isinstance(again, Snapshot)
    assert again.state["name"] is None and again.state["date_of_birth"] is None


def _sealed_registration(ring: Keyring, subject: uuid.UUID) -> contracts.PatientRegisteredV3:
    state: dict[str, Any] = {
        "name": "Ada Lovelace",
        "given_name": "Ada",
        "family_name": "Lovelace",
        "email": "ada@example.org",
        "address": "12 St James's Square",
        "date_of_birth": date(1990, 12, 10),
    }
    ring.seal_fields(PATIENT_DETAILS, subject, state)
    return contracts.PatientRegisteredV3(**state, registered_date=date(2024, 1, 2))


def _body(data: Any, subject: uuid.UUID, version: int) -> bytes:
    return msgspec.json.encode(
        contracts.envelope(
            data,
            aggregate_id=subject,
            aggregate_version=version,
            position=version,
            occurred_at=datetime.now(UTC),
        )
    )


class _Given(EventBatchWorker):
    """Keeps what it is given; with `keyring`, opens the fields it `reads` (all if None)."""

    def __init__(self, keyring: Keyring | None = None, reads: set[str] | None = None) -> None:
        super().__init__("test-erasure", KafkaBroker(), "test.dead")
        self.given: list[Any] = []
        if keyring is not None:
            self.keyring = keyring
        if reads is not None:
            self.reads = frozenset(reads)

    async def apply(self, batch: Batch) -> None:
        self.given.extend(data for _, data in batch)


async def test_a_consumer_reading_some_fields_gets_those_opened_and_still_sees_an_erasure(
    keyrings: tuple[Keyring, Keyring],
):
    writer, reader = keyrings
    kept, erased = uuid.uuid4(), uuid.uuid4()
    bodies = [_body(_sealed_registration(writer, s), s, 1) for s in (kept, erased)]
    writer.destroy(erased)
    worker = _Given(reader, {"email", "date_of_birth"})
    await worker.handle(bodies)
    opened, gone = worker.given
    assert isinstance(opened, contracts.PatientRegisteredV2)
    assert (opened.email, opened.date_of_birth) == ("ada@example.org", date(1990, 12, 10))
    assert is_sealed(opened.name) and is_sealed(opened.address)  # not read: not opened
    assert isinstance(gone, contracts.Unreadable)
    # Reading no field at all still tells an erased patient's payload apart.
    nothing = _Given(reader, set())
    await nothing.handle(bodies)
    assert isinstance(nothing.given[0], contracts.PatientRegisteredV2)
    assert isinstance(nothing.given[1], contracts.Unreadable)


async def test_a_consumer_that_opens_nothing_still_forgets_an_erased_patients_key(
    keyrings: tuple[Keyring, Keyring],
):
    """The erasure in a batch drops the key from the consumer's keyring even when the
    consumer opens nothing (here no erasure notice reaches it: the reader does not listen)."""
    writer, reader = keyrings
    subject = uuid.uuid4()
    token = writer.seal(subject, "email", "a@example.org")
    assert reader.open(token, "email") == "a@example.org"  # the reader holds the key
    writer.destroy(subject)
    assert reader.open(token, "email") == "a@example.org"  # not told yet
    worker = _Given()
    worker.opens_sealed = False
    worker.keyring = reader
    erasure = contracts.PatientErasedV1(reason="request 7", erased_by="admin")
    await worker.handle([_body(erasure, subject, 2)])
    assert worker.given == [erasure]
    assert reader.open(token, "email") is None


def test_each_field_and_each_new_key_gets_a_nonce_of_its_own(keyring: Keyring):
    """Random bytes are drawn once per record (and once per batch of new keys) and cut into
    nonces: equal values still seal to different tokens, and each key opens only its own."""
    ada, grace = uuid.uuid4(), uuid.uuid4()
    minted = dict(keyring.mint([ada, grace, ada]))
    assert set(minted) == {ada, grace}
    assert minted[ada][:12] != minted[grace][:12]  # the wrapping nonces
    state: dict[str, Any] = {"name": "Same", "given_name": "Same", "family_name": "Same"}
    keyring.seal_fields(PATIENT_DETAILS, ada, state)
    bodies = [state[f].rsplit(":", 1)[1] for f in ("name", "given_name", "family_name")]
    assert len(set(bodies)) == 3 and len({b[:16] for b in bodies}) == 3
    other = {"name": "Same"}
    keyring.seal_fields(PATIENT_DETAILS, grace, other)
    assert keyring.open(state["name"], "name") == keyring.open(other["name"], "name") == "Same"


def test_new_patients_keys_are_stored_with_their_events_and_open_elsewhere(
    settings: Settings, store: EventStore
):
    from domain.patients import PatientDetails

    patients = [
        Patient.register(
            PatientDetails(
                f"Key Batch {n}", f"kb-{uuid.uuid4().hex}@example.org", "1 Rd", date(1980, 1, 1)
            ),
            date(2024, 1, 1),
        )
        for n in range(3)
    ]
    store.save(*patients)
    ring = Keyring.from_settings(settings)
    fresh = EventStore(settings.database_url, keyring=ring)
    try:
        assert [fresh.repository.get(p.id).name for p in patients] == [
            f"Key Batch {n}" for n in range(3)
        ]
    finally:
        fresh.close()
        ring.close()
    # A key row that exists already fails the save (nothing of it is stored), as a
    # conflicting event would.
    taken = uuid.uuid4()
    assert store.keyring is not None
    store.keyring.seal(taken, "name", "made elsewhere")  # its key row, and no event
    store.keyring.forget(taken)
    clash = Patient.register(
        PatientDetails("Key Clash", f"kc-{uuid.uuid4().hex}@example.org", "1 Rd", date(1980, 1, 1)),
        date(2024, 1, 1),
        taken,
    )
    with pytest.raises(IntegrityError):
        store.save(clash)
    assert store.recorder.select_events(taken) == []


async def test_a_key_read_for_a_reader_of_no_field_opens_later_and_an_erasure_still_wins(
    keyrings: tuple[Keyring, Keyring],
):
    """Keys are read wrapped and unwrapped on first use; an erasure told in between wins."""
    writer, reader = keyrings
    kept, erased = uuid.uuid4(), uuid.uuid4()
    bodies = [_body(_sealed_registration(writer, s), s, 1) for s in (kept, erased)]
    nothing = _Given(reader, set())
    await nothing.handle(bodies)  # both keys now held, still wrapped
    assert [type(d) for d in nothing.given] == [contracts.PatientRegisteredV2] * 2
    writer.destroy(erased)
    reader.forget(erased)  # as the erasure notice or the erasure event does
    some = _Given(reader, {"email"})
    await some.handle(bodies)
    opened, gone = some.given
    assert isinstance(opened, contracts.PatientRegisteredV2)
    assert opened.email == "ada@example.org"
    assert isinstance(gone, contracts.Unreadable)
    # A key being unwrapped while its erasure is told is used once, never kept.
    late = uuid.uuid4()
    writer.seal(late, "name", "Late")
    entry = reader._entry(late)
    assert isinstance(entry, bytes)
    reader.forget(late)
    reader._usable(late, entry)
    assert reader._cached(late) == (False, None)


def test_opening_a_record_unwraps_its_key_once(keyrings: tuple[Keyring, Keyring]):
    writer, reader = keyrings
    subject = uuid.uuid4()
    state = msgspec.structs.asdict(_sealed_registration(writer, subject))
    unwrapped: list[uuid.UUID] = []
    unwrap = reader._unwrap

    def counted(of: uuid.UUID, wrapped: bytes) -> Any:
        unwrapped.append(of)
        return unwrap(of, wrapped)

    reader._unwrap = counted  # type: ignore[method-assign]
    assert reader.open_fields(PATIENT_DETAILS, state)
    assert state["name"] == "Ada Lovelace" and state["date_of_birth"] == date(1990, 12, 10)
    assert unwrapped == [subject]
