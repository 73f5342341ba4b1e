"""The directory projection: idempotent under redelivery and replay, and under SIGKILL."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from commands.service import PatientService
from commands.store import EventStore
from domain import contracts
from domain.contracts import (
    PATIENT_STREAM,
    PatientDetailsChangedV1,
    PatientPreferencesChangedV1,
    PatientRegisteredV1,
    PatientRegisteredV2,
    PatientRemovedV1,
    Unreadable,
)
from projections.directory import DirectoryProjection
from readmodels.directory import Tables, create_copy
from runtime.db import open_pool
from runtime.kafka import client_options
from tests.support.patients import details, published, sealed_registration
from tests.support.stack import Process, claim_key, eventually, read_topic

pytestmark = pytest.mark.integration


def expected_directory(store: EventStore, ids: set[str]) -> dict[str, tuple[int, bool, str]]:
    """What the read model must hold: each patient's version, removal and name, from the store."""
    want = {}
    for envelope, data in published(store):
        key = str(envelope.aggregate_id)
        if key in ids:
            name = getattr(data, "name", None) or want.get(key, (0, False, ""))[2]
            want[key] = (
                envelope.aggregate_version,
                type(data).__name__.startswith("PatientRemoved"),
                name,
            )
    return want


async def actual_directory(
    conn: Any, table: str, ids: set[str]
) -> dict[str, tuple[int, bool, str]]:
    rows = await (
        await conn.execute(
            f"SELECT id::text, version, removed, name FROM {table} WHERE id::text = ANY(%s)",
            [list(ids)],
        )
    ).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


@pytest.fixture(scope="module")
def history(store: EventStore) -> tuple[list[Any], set[str]]:
    """A few patients' full histories: registered, changed, some removed."""
    service = PatientService(store, claim_key())
    start = (store.recorder.max_notification_id() or 0) + 1
    ids = set()
    for i in range(6):
        written = service.register(details(f"Patient {i}"), date(2024, 1, 1))
        ids.add(str(written.patient_id))
        for j in range(i % 3):
            service.change(written.patient_id, details(f"Patient {i} v{j + 2}"))
        if i % 2:
            service.remove(written.patient_id)
    return published(store, start), ids


def interleavings(events: list[Any]) -> st.SearchStrategy[list[Any]]:
    """Deliveries as Kafka may make them: per-patient order kept, with resent suffixes."""

    @st.composite
    def build(draw: st.DrawFn) -> list[Any]:
        by_patient: dict[Any, list[Any]] = {}
        for item in events:
            by_patient.setdefault(item[0].aggregate_id, []).append(item)
        streams = []
        for items in by_patient.values():
            stream = list(items)
            for _ in range(draw(st.integers(0, 2))):  # a crash resends from an earlier point
                cut = draw(st.integers(0, len(items) - 1))
                stream += items[cut:]
            streams.append(stream)
        out: list[Any] = []
        while any(streams):
            pick = draw(st.sampled_from([s for s in streams if s]))
            out.append(pick.pop(0))
        return out

    return build()


async def test_any_redelivery_or_replay_ends_in_the_same_read_model(settings, history):
    events, ids = history
    pool = await open_pool(settings.database_url)
    try:
        reference = Tables(patients="directory_reference", tracking="tracking_reference")
        async with pool.connection() as conn:
            await create_copy(conn, reference)
            await DirectoryProjection(reference).apply(conn, events)
            want = await actual_directory(conn, reference.patients, ids)
        assert want == expected_directory_from(events)

        runs = 0

        @hypothesis_settings(
            max_examples=25, deadline=None, suppress_health_check=list(HealthCheck)
        )
        @given(delivery=interleavings(events), batch=st.integers(1, 7))
        def check(delivery: list[Any], batch: int) -> None:
            nonlocal runs
            runs += 1
            tables = Tables(patients=f"directory_h{runs}", tracking=f"tracking_h{runs}")

            async def run() -> None:
                async with pool.connection() as conn:
                    await create_copy(conn, tables)
                    projection = DirectoryProjection(tables)
                    for i in range(0, len(delivery), batch):
                        await projection.apply(conn, delivery[i : i + batch])
                    assert await actual_directory(conn, tables.patients, ids) == want
                    applied = await (
                        await conn.execute(f"SELECT applied FROM {tables.tracking}")
                    ).fetchone()
                    assert applied == (len(events),), "an event was applied twice"
                    await conn.execute(f"DROP TABLE {tables.patients}, {tables.tracking}")

            asyncio.run_coroutine_threadsafe(run(), loop).result()

        loop = asyncio.get_running_loop()
        await asyncio.to_thread(check)
        assert runs >= 25
    finally:
        await pool.close()


def expected_directory_from(events: list[Any]) -> dict[str, tuple[int, bool, str]]:
    want: dict[str, tuple[int, bool, str]] = {}
    for envelope, data in events:
        key = str(envelope.aggregate_id)
        name = getattr(data, "name", None) or want[key][2]
        want[key] = (envelope.aggregate_version, type(data).__name__ == "PatientRemovedV1", name)
    return want


async def test_an_event_for_an_unknown_patient_is_refused_not_skipped(settings, history):
    events, _ = history
    orphan = next(item for item in events if item[0].aggregate_version == 2)
    pool = await open_pool(settings.database_url)
    try:
        tables = Tables(patients="directory_orphans", tracking="tracking_orphans")
        async with pool.connection() as conn:
            await create_copy(conn, tables)
            from projections.directory import UnappliableEvent

            with pytest.raises(UnappliableEvent):
                await DirectoryProjection(tables).apply(conn, [orphan])
    finally:
        await pool.close()


@pytest.mark.fault
async def test_a_killed_projection_restarts_and_applies_everything_once(
    own_settings, own_store: EventStore, tmp_path: Path
):
    """Relay and projection run as real processes; the projection is SIGKILLed mid-load."""
    settings, store = own_settings, own_store
    rng = random.Random(5)
    service = PatientService(store, claim_key())
    relay = Process(["relay"], settings, "relay", tmp_path / "relay").start()
    projection = Process(
        ["project", "directory"], settings, "projection", tmp_path / "proj"
    ).start()
    ids: set[str] = set()

    def write(count: int) -> None:
        for _ in range(count):
            written = service.register(details(), date(2024, 1, 1))
            ids.add(str(written.patient_id))
            if rng.random() < 0.5:
                service.change(written.patient_id, details("Changed Name"))
            if rng.random() < 0.2:
                service.remove(written.patient_id)

    try:
        for _ in range(3):
            writer = asyncio.to_thread(write, 80)
            await asyncio.sleep(rng.uniform(0.3, 1.0))
            projection.kill()
            await writer
            projection.start()
        want = expected_directory(store, ids)
        async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:

            async def converged() -> bool:
                return await actual_directory(conn, "directory_patients", ids) == want

            try:
                await eventually(converged, timeout=90, pause=0.25)
            except AssertionError:
                got = await actual_directory(conn, "directory_patients", ids)
                wrong = {k: (got.get(k), v) for k, v in want.items() if got.get(k) != v}
                raise AssertionError(
                    f"{len(wrong)} of {len(want)} differ: {list(wrong.items())[:3]}"
                ) from None
            applied, position = await (
                await conn.execute(
                    "SELECT applied, position FROM projection_tracking"
                    " WHERE projection = 'directory'"
                )
            ).fetchone()
    finally:
        projection.stop()
        relay.stop()
    total = len(published(store))
    assert applied == total, f"applied {applied} times for {total} events"
    assert position == max(e.position for e, _ in published(store))
    # The dead-letter topic stayed empty: nothing was set aside.
    dlq = settings.topic(PATIENT_STREAM) + ".dlq.carelog-directory"
    assert await read_topic(settings, dlq, 1, timeout=2) == []
    assert projection.starts == 4


async def test_poison_messages_are_dead_lettered_and_the_projection_carries_on(
    own_settings, own_store: EventStore, tmp_path: Path
):
    """Undecodable bytes, and a well-formed event the database refuses (a NUL in a name)."""
    from aiokafka import AIOKafkaProducer

    settings, store = own_settings, own_store
    patient_id = uuid.uuid4()
    refused = contracts.envelope(
        PatientRegisteredV1(
            name="Null\x00Name",
            email="nul@example.org",
            address="1 Road",
            date_of_birth=date(1990, 1, 1),
            registered_date=date(2024, 1, 1),
        ),
        aggregate_id=patient_id,
        aggregate_version=1,
        position=1,
        occurred_at=datetime.now(UTC),
    )
    relay = Process(["relay"], settings, "relay", tmp_path / "relay2").start()
    projection = Process(["project", "directory"], settings, "projection", tmp_path / "p2").start()
    try:
        producer = AIOKafkaProducer(**client_options(settings))
        await producer.start()
        try:
            topic = settings.topic(PATIENT_STREAM)
            await producer.send_and_wait(topic, b"{not an event", key=b"x")
            await producer.send_and_wait(topic, msgspec.json.encode(refused), key=b"y")
        finally:
            await producer.stop()
        written = PatientService(store, claim_key()).register(
            details("After Poison"), date(2024, 1, 1)
        )
        async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:

            async def projected() -> bool:
                row = await (
                    await conn.execute(
                        "SELECT version FROM directory_patients WHERE id = %s", [written.patient_id]
                    )
                ).fetchone()
                return row == (1,)

            await eventually(projected, timeout=60)
    finally:
        projection.stop()
        relay.stop()
    dlq = settings.topic(PATIENT_STREAM) + ".dlq.carelog-directory"
    dead = await read_topic(settings, dlq, 2, timeout=30)
    reasons = sorted(dict(r.headers)["error"].decode() for r in dead)
    assert len(dead) == 2
    assert reasons[0] == "the database refused it: DataError"
    assert reasons[1].startswith("undecodable")
    assert b"{not an event" in [r.value for r in dead]
    assert "Null" not in projection.tail()  # the refused value is never logged


def registered(name: str) -> PatientRegisteredV2:
    given, family = name.rsplit(" ", 1)
    return PatientRegisteredV2(
        name=name,
        given_name=given,
        family_name=family,
        email=f"{family.lower()}@example.org",
        address="1 Road",
        date_of_birth=date(1990, 1, 1),
        registered_date=date(2024, 1, 1),
    )


def event(patient: uuid.UUID, version: int, position: int, data: Any, sealed: Any = None) -> Any:
    """(envelope, decoded event); an `Unreadable` one's envelope carries `sealed`."""
    envelope = contracts.envelope(
        sealed if isinstance(data, Unreadable) else data,
        aggregate_id=patient,
        aggregate_version=version,
        position=position,
        occurred_at=datetime(2024, 1, 1, tzinfo=UTC),
        actor_id=f"user-{position}",
        actor_role="receptionist",
        correlation_id=f"c-{position}",
    )
    return envelope, data


def mixed_batch() -> tuple[list[Any], list[Any]]:
    """(an earlier batch, a batch mixing registrations with other events): registrations
    before and after a change and a removal, one redelivered right after itself, one
    after its patient's change, one of a patient the earlier batch applied, and erased
    patients' registrations (a rebuild's), one redelivered."""
    a, b, c, d, e, f, g = (uuid.uuid4() for _ in range(7))
    sealed = sealed_registration(date(2023, 6, 1))

    reg_e = event(e, 1, 1, registered("Eve Earlier"))
    reg_a = event(a, 1, 2, registered("Ann Alpha"))
    reg_d = event(d, 1, 7, registered("Dan Delta"))
    reg_f = event(f, 1, 8, Unreadable(sealed), sealed)
    details = PatientDetailsChangedV1(
        name="Ann Changed",
        email="alpha@example.org",
        address="1 Road",
        date_of_birth=date(1990, 1, 1),
    )
    change_a = event(a, 2, 4, details)
    batch = [
        reg_a,
        event(b, 1, 3, registered("Bob Beta")),
        change_a,  # compared with Ann's row: her registration must apply first
        event(c, 1, 5, registered("Cat Gamma")),
        event(b, 2, 6, PatientRemovedV1()),
        reg_a,  # after her change: older, a duplicate
        reg_d,
        reg_d,  # twice in one run: written once
        reg_e,  # applied by the earlier batch
        reg_f,
        reg_f,
        event(g, 1, 9, registered("Gus Eta")),
    ]
    return [reg_e], batch


async def model(conn: Any, tables: Tables) -> dict[str, list[Any]]:
    """Every row of the directory's tables but the time each was written."""
    queries = {
        "patients": f"SELECT id, version, position, name, name_key, email, email_key, address,"
        f" date_of_birth, registered_date, removed, erased, given_name, family_name"
        f" FROM {tables.patients} ORDER BY id",
        "history": f"SELECT * FROM {tables.history} ORDER BY patient_id, version",
        "positions": f"SELECT * FROM {tables.positions} ORDER BY position",
        "tracking": f"SELECT projection, position, applied FROM {tables.tracking}",
    }
    return {k: await (await conn.execute(q)).fetchall() for k, q in queries.items()}


async def together_and_alone(
    settings: Any, earlier: list[Any], batch: list[Any]
) -> tuple[dict[str, Any], dict[str, list[Any]], dict[str, list[Any]]]:
    """Applies `earlier`, then `batch` in one batch and, on other tables, one event per
    batch: ((applied, duplicates, position) of both ways, rows together, rows alone)."""
    suffix = uuid.uuid4().hex[:8]
    together, alone = (
        Tables(
            patients=f"directory_{kind}_{suffix}",
            tracking=f"tracking_{kind}_{suffix}",
            positions=f"positions_{kind}_{suffix}",
            history=f"history_{kind}_{suffix}",
        )
        for kind in ("together", "alone")
    )
    async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
        await conn.set_autocommit(True)
        try:
            counts = {}
            for kind, tables in (("together", together), ("alone", alone)):
                await create_copy(conn, tables)
                projection = DirectoryProjection(tables, name=tables.tracking)
                await projection.apply(conn, earlier)
                outcomes = (
                    [await projection.apply(conn, batch)]
                    if tables is together
                    else [await projection.apply(conn, [event]) for event in batch]
                )
                counts[kind] = (
                    sum(o.applied for o in outcomes),
                    sum(o.duplicates for o in outcomes),
                    max(o.position for o in outcomes),
                )
            got, want = await model(conn, together), await model(conn, alone)
            for rows in (got, want):
                rows["tracking"] = [r[1:] for r in rows["tracking"]]  # their names differ
            return counts, got, want
        finally:
            for tables in (together, alone):
                await conn.execute(
                    f"DROP TABLE IF EXISTS {tables.patients}, {tables.tracking},"
                    f" {tables.positions}, {tables.history}"
                )


async def test_one_mixed_batch_ends_as_its_events_applied_one_by_one(settings):
    earlier, batch = mixed_batch()
    counts, got, want = await together_and_alone(settings, earlier, batch)
    # Ann, Bob and Cat, Ann's change, Bob's removal, Dan, Fay and Gus applied; Ann,
    # Dan, Eve and Fay again are duplicates.
    assert counts["together"] == counts["alone"] == (8, 4, 9)
    assert got == want
    assert len(got["patients"]) == 7 and len(got["history"]) == 9
    assert len(got["positions"]) == 9
    by_id = {r[0]: r for r in got["patients"]}
    ann = by_id[batch[0][0].aggregate_id]
    assert (ann[1], ann[3], ann[12], ann[13]) == (2, "Ann Changed", "Ann", "Changed")
    fay = by_id[batch[9][0].aggregate_id]
    assert fay[3:] == ("", "", "", "", "", None, date(2023, 6, 1), True, True, None, None)
    changed = next(r for r in got["history"] if r[3] == "PatientDetailsChanged")
    assert changed[8] == ["name"] and changed[9] == {"name": "Ann Changed"}


def changed(
    name: str, *, email: str | None = None, address: str = "1 Road", born: date | None = None
) -> PatientDetailsChangedV1:
    """A details change from `registered(name)`'s details: what is given differs."""
    return PatientDetailsChangedV1(
        name=name,
        email=email or f"{name.rsplit(' ', 1)[1].lower()}@example.org",
        address=address,
        date_of_birth=born or date(1990, 1, 1),
    )


def changes_batch() -> tuple[list[Any], list[Any]]:
    """(an earlier batch, a batch of details changes among other events): changes for
    different patients one after another, one redelivered after it applied, a patient
    changed twice in a row (each compared with the row before it), a change for a
    patient registered earlier in the batch, and changes followed by their patients'
    later events (a removal, a preferences change) and by a redelivery."""
    a, b, c, d, e = (uuid.uuid4() for _ in range(5))
    change_a = event(a, 2, 5, changed("Ann Moved", email="alpha@example.org", address="2 Lane"))
    earlier = [
        event(a, 1, 1, registered("Ann Alpha")),
        event(b, 1, 2, registered("Bob Beta")),
        event(c, 1, 3, registered("Cat Gamma")),
        event(d, 1, 4, registered("Dan Delta")),
        change_a,
    ]
    change_d = event(d, 2, 9, changed("Dan Renamed", email="delta@example.org"))
    batch = [
        event(e, 1, 6, registered("Eve Epsilon")),
        event(b, 2, 7, changed("Bob Beta", email="bob@example.org")),
        event(c, 2, 8, changed("Cat Gamma", address="3 Close")),
        change_a,  # applied by the earlier batch: a duplicate
        change_d,
        # Dan again: compared with his row as his first change left it (email only).
        event(d, 3, 10, changed("Dan Renamed", email="dan@example.org")),
        event(e, 2, 11, changed("Eve Epsilon", born=date(1991, 2, 3))),  # registered above
        event(e, 3, 12, PatientRemovedV1()),  # after Eve's change, not before it
        event(b, 3, 13, changed("Bob Beta", email="bob@example.org")),  # nothing differs
        event(b, 4, 14, PatientPreferencesChangedV1(reminders=False)),
        event(c, 3, 15, changed("Cat Gamma", address="4 Row")),
        change_d,  # after Dan's later change: a duplicate
    ]
    return earlier, batch


async def test_details_changes_in_one_batch_end_as_applied_one_by_one(settings):
    earlier, batch = changes_batch()
    counts, got, want = await together_and_alone(settings, earlier, batch)
    # Eve's registration and every event but Ann's change and Dan's first (again) applied.
    assert counts["together"] == counts["alone"] == (10, 2, 15)
    assert got == want
    assert len(got["history"]) == 5 + 10 and len(got["positions"]) == 5 + 10
    ann, bob, cat, dan, eve = (batch[i][0].aggregate_id for i in (3, 1, 2, 4, 0))
    by_id = {r[0]: r for r in got["patients"]}
    assert (by_id[dan][1], by_id[dan][3], by_id[dan][5]) == (3, "Dan Renamed", "dan@example.org")
    assert (by_id[dan][12], by_id[dan][13]) == ("Dan", "Renamed")
    assert (by_id[eve][1], by_id[eve][8], by_id[eve][10]) == (3, date(1991, 2, 3), True)
    assert (by_id[bob][1], by_id[cat][1], by_id[cat][7]) == (4, 3, "4 Row")
    fields = {(r[0], r[1]): (r[8], r[9]) for r in got["history"] if r[3] == "PatientDetailsChanged"}
    assert fields == {
        (ann, 2): (["name", "address"], {"name": "Ann Moved", "address": "2 Lane"}),
        (bob, 2): (["email"], {"email": "bob@example.org"}),
        (bob, 3): ([], {}),
        (cat, 2): (["address"], {"address": "3 Close"}),
        (cat, 3): (["address"], {"address": "4 Row"}),
        (dan, 2): (["name"], {"name": "Dan Renamed"}),
        (dan, 3): (["email"], {"email": "dan@example.org"}),
        (eve, 2): (["dateOfBirth"], {"dateOfBirth": "1991-02-03"}),
    }
