"""Analytics are exact: a known, random event history is projected (twice, to show
redelivery changes nothing) and every bucket is compared with a count made here,
independently, in the practice's time zone."""

from __future__ import annotations

import random
import statistics
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import psycopg
import pytest
from litestar.testing import AsyncTestClient

from domain import contracts as c
from domain.billing import InvoiceIssuedV1, PaymentRecordedV1
from domain.roles import Role
from projections.analytics import AnalyticsProjection
from read_api.app import create_app
from readmodels.analytics import Tables
from runtime.db import open_pool
from runtime.settings import Settings
from tests.support.patients import sealed_registration
from tests.support.tokens import TestTokens

pytestmark = pytest.mark.integration

ZONE = ZoneInfo("Europe/London")
YEAR_START = datetime(2025, 1, 1, tzinfo=UTC)


def instant(rng: random.Random, days: int = 365) -> datetime:
    return YEAR_START + timedelta(minutes=rng.randrange(days * 24 * 60))


def local(moment: datetime) -> date:
    return moment.astimezone(ZONE).date()


def bucket(day: date, interval: str) -> date:
    if interval == "week":
        return day - timedelta(days=day.weekday())
    if interval == "month":
        return day.replace(day=1)
    return day


class History:
    """A random history of the three streams, as published envelopes, and what it means."""

    def __init__(self, seed: int):
        rng = random.Random(seed)
        self.envelopes: list[tuple[c.Envelope[Any], Any]] = []
        self.position = 0
        self.patients: list[dict[str, Any]] = []
        self.appointments: list[dict[str, Any]] = []
        self.money: list[dict[str, Any]] = []
        for _ in range(300):
            pid = uuid.uuid4()
            born = date(1930, 1, 1) + timedelta(days=rng.randrange(34_000))
            registered = date(2025, 1, 1) + timedelta(days=rng.randrange(365))
            self.emit(
                pid,
                1,
                c.PatientRegisteredV2(
                    name="P Q",
                    given_name="P",
                    family_name="Q",
                    email="p@example.org",
                    address="x",
                    date_of_birth=born,
                    registered_date=registered,
                ),
                instant(rng),
            )
            removed = None
            if rng.random() < 0.2:
                removed = instant(rng)
                self.emit(pid, 2, c.PatientRemovedV1(), removed)
            self.patients.append({"registered": registered, "born": born, "removed": removed})
        clinicians = [uuid.uuid4() for _ in range(4)]
        for _ in range(400):
            aid, clinician = uuid.uuid4(), rng.choice(clinicians)
            booked = instant(rng, 330)
            start = (booked + timedelta(minutes=5 * rng.randrange(12, 12 * 24 * 40))).replace(
                second=0, microsecond=0
            )
            self.emit(
                aid,
                1,
                c.AppointmentBookedV1(
                    patient_id=uuid.uuid4(),
                    clinician_id=clinician,
                    start=start,
                    duration_minutes=30,
                    reason="r",
                ),
                booked,
            )
            version = 2
            if rng.random() < 0.3:
                start = start + timedelta(hours=rng.randrange(1, 100))
                self.emit(
                    aid,
                    version,
                    c.AppointmentRescheduledV1(start=start, duration_minutes=30),
                    booked,
                )
                version += 1
            status = rng.choice(["booked", "completed", "cancelled", "no-show"])
            if status == "completed":
                self.emit(aid, version, c.AppointmentCheckedInV1(), start)
                self.emit(aid, version + 1, c.AppointmentCompletedV1(), start)
            elif status == "cancelled":
                self.emit(aid, version, c.AppointmentCancelledV1(reason="x"), booked)
            elif status == "no-show":
                self.emit(aid, version, c.AppointmentNoShowV1(), start)
            self.appointments.append(
                {"clinician": clinician, "booked": booked, "start": start, "status": status}
            )
        for i in range(350):
            account, at = uuid.uuid4(), instant(rng)
            currency = rng.choice(["GBP", "EUR"])
            amount = rng.randrange(100, 50_000)
            if i < 200:
                data: Any = InvoiceIssuedV1(
                    invoice_id=uuid.uuid4(),
                    patient_id=uuid.uuid4(),
                    currency=currency,
                    total_minor=amount,
                    line_count=1,
                    balance_minor=amount,
                )
            else:
                data = PaymentRecordedV1(
                    payment_id=uuid.uuid4(),
                    patient_id=uuid.uuid4(),
                    currency=currency,
                    amount_minor=amount,
                    balance_minor=0,
                )
            self.emit(account, 2, data, at)
            self.money.append(
                {
                    "kind": "invoiced" if i < 200 else "paid",
                    "currency": currency,
                    "amount": amount,
                    "at": at,
                }
            )

    def emit(self, aggregate: uuid.UUID, version: int, data: Any, at: datetime) -> None:
        self.position += 1
        envelope = c.envelope(
            data,
            aggregate_id=aggregate,
            aggregate_version=version,
            position=self.position,
            occurred_at=at,
        )
        self.envelopes.append((envelope, data))


@pytest.fixture(scope="module")
def history() -> History:
    return History(seed=2025)


@pytest.fixture
async def client(
    own_settings: Settings, tokens: TestTokens, history: History
) -> AsyncIterator[AsyncTestClient[Any]]:
    pool = await open_pool(own_settings.database_url, min_size=1, max_size=2)
    projection = AnalyticsProjection()
    async with pool.connection() as conn:
        for _ in range(2):  # delivered twice: nothing may count twice
            for i in range(0, len(history.envelopes), 97):
                await projection.apply(conn, history.envelopes[i : i + 97])
    await pool.close()
    settings = own_settings.with_(practice_timezone="Europe/London", read_wait_seconds=0.3)
    async with AsyncTestClient(app=create_app(settings, verifier=tokens.verifier)) as test_client:
        test_client.headers.update(tokens.headers(Role.ANALYST))
        yield test_client


@pytest.mark.parametrize("interval", ["day", "week", "month"])
async def test_registrations_and_removals_per_bucket_are_exact(client, history, interval):
    start, end = date(2025, 1, 1), date(2025, 12, 31)
    answer = await client.get(
        "/analytics/registrations", params={"from": start, "to": end, "interval": interval}
    )
    assert answer.status_code == 200, answer.text
    registered = Counter(bucket(p["registered"], interval) for p in history.patients)
    removed = Counter(
        bucket(local(p["removed"]), interval)
        for p in history.patients
        if p["removed"] and start <= local(p["removed"]) <= end
    )
    buckets = answer.json()["buckets"]
    assert len(buckets) == len({bucket(start + timedelta(d), interval) for d in range(365)})
    for row in buckets:
        day = date.fromisoformat(row["start"])
        assert (row["registrations"], row["removals"]) == (registered[day], removed[day]), day
    assert sum(r["registrations"] for r in buckets) == 300


@pytest.mark.parametrize("at", [date(2025, 3, 30), date(2025, 10, 26), date(2026, 1, 1)])
async def test_age_bands_on_a_day_are_exact(client, history, at):
    answer = await client.get("/analytics/patients/age-bands", params={"at": at})
    assert answer.status_code == 200, answer.text

    def band(born: date) -> str:
        age = at.year - born.year - ((at.month, at.day) < (born.month, born.day))
        return "0-17" if age < 18 else "18-39" if age < 40 else "40-64" if age < 65 else "65+"

    expected = Counter(
        band(p["born"])
        for p in history.patients
        if p["registered"] <= at
        and p["born"] <= at
        and not (p["removed"] and local(p["removed"]) <= at)
    )
    assert answer.json()["bands"] == {k: expected[k] for k in ("0-17", "18-39", "40-64", "65+")}


@pytest.mark.parametrize("interval", ["week", "month"])
async def test_appointments_per_bucket_are_exact(client, history, interval):
    start, end = date(2025, 1, 1), date(2026, 2, 28)
    answer = await client.get(
        "/analytics/appointments", params={"from": start, "to": end, "interval": interval}
    )
    assert answer.status_code == 200, answer.text
    grouped: dict[date, list[dict[str, Any]]] = defaultdict(list)
    for a in history.appointments:
        if start <= local(a["start"]) <= end:
            grouped[bucket(local(a["start"]), interval)].append(a)
    for row in answer.json()["buckets"]:
        these = grouped[date.fromisoformat(row["start"])]
        statuses = Counter(a["status"] for a in these)
        assert row["booked"] == len(these)
        assert (row["completed"], row["cancelled"], row["noShow"]) == (
            statuses["completed"],
            statuses["cancelled"],
            statuses["no-show"],
        )
        attended = statuses["completed"] + statuses["no-show"]
        assert row["noShowRate"] == (round(statuses["no-show"] / attended, 4) if attended else None)
        leads = [(a["start"] - a["booked"]).total_seconds() / 3600 for a in these]
        assert row["medianLeadHours"] == (round(statistics.median(leads), 2) if leads else None)


async def test_appointments_of_one_clinician(client, history):
    clinician = history.appointments[0]["clinician"]
    answer = await client.get(
        "/analytics/appointments",
        params={
            "from": "2025-01-01",
            "to": "2026-03-31",
            "interval": "month",
            "clinicianId": clinician,
        },
    )
    assert sum(r["booked"] for r in answer.json()["buckets"]) == sum(
        1 for a in history.appointments if a["clinician"] == clinician
    )


async def test_billing_per_currency_and_bucket_is_exact(client, history):
    start, end = date(2025, 1, 1), date(2025, 12, 31)
    answer = await client.get(
        "/analytics/billing", params={"from": start, "to": end, "interval": "month"}
    )
    assert answer.status_code == 200, answer.text
    for row in answer.json()["buckets"]:
        month = date.fromisoformat(row["start"])
        following = (month + timedelta(days=32)).replace(day=1)
        mine = [m for m in history.money if m["currency"] == row["currency"]]

        def total(kind: str, rows: list[dict[str, Any]]) -> int:
            return sum(m["amount"] for m in rows if m["kind"] == kind)

        inside = [m for m in mine if bucket(local(m["at"]), "month") == month]
        before_end = [m for m in mine if local(m["at"]) < following]
        assert row["invoicedMinor"] == total("invoiced", inside)
        assert row["paidMinor"] == total("paid", inside)
        assert row["outstandingMinor"] == total("invoiced", before_end) - total("paid", before_end)
    gbp = await client.get(
        "/analytics/billing",
        params={"from": start, "to": end, "interval": "month", "currency": "GBP"},
    )
    assert {r["currency"] for r in gbp.json()["buckets"]} == {"GBP"}


async def test_bad_ranges_and_intervals_name_each_parameter(client, tokens):
    bad = await client.get(
        "/analytics/registrations", params={"from": "2025-13-01", "to": "soon", "interval": "hour"}
    )
    assert bad.status_code == 400
    assert set(bad.json()["errors"]) == {"from", "to", "interval"}
    backwards = await client.get(
        "/analytics/billing", params={"from": "2025-02-01", "to": "2025-01-01"}
    )
    assert backwards.status_code == 400 and set(backwards.json()["errors"]) == {"to"}
    missing = await client.get("/analytics/appointments", params={"interval": "day"})
    assert missing.status_code == 400
    assert {"from", "to"} <= set(missing.json()["errors"])
    receptionist = await client.get(
        "/analytics/patients/age-bands",
        params={"at": "2025-01-01"},
        headers=tokens.headers(Role.RECEPTIONIST),
    )
    assert receptionist.status_code == 403
    waiting = await client.get(
        "/analytics/patients/age-bands", params={"at": "2025-01-01", "minPosition": 10**9}
    )
    assert waiting.status_code == 503


async def test_one_mixed_batch_counts_as_its_events_applied_one_by_one(settings):
    """Registrations go as one statement per run: the facts, positions and counts are those
    of the same events applied one batch each."""
    a, b, c2, d, e = (uuid.uuid4() for _ in range(5))
    at = datetime(2025, 3, 1, tzinfo=UTC)
    sealed = sealed_registration(date(2025, 2, 1))

    def event(aggregate: uuid.UUID, version: int, position: int, data: Any) -> Any:
        published = sealed if isinstance(data, c.Unreadable) else data
        envelope = c.envelope(
            published,
            aggregate_id=aggregate,
            aggregate_version=version,
            position=position,
            occurred_at=at,
        )
        return envelope, data

    def registered(born: date) -> c.PatientRegisteredV2:
        return c.PatientRegisteredV2(
            name="P Q",
            given_name="P",
            family_name="Q",
            email="p@example.org",
            address="x",
            date_of_birth=born,
            registered_date=date(2025, 1, 2),
        )

    reg_a = event(a, 1, 2, registered(date(1950, 1, 1)))
    reg_e = event(e, 1, 1, registered(date(1980, 1, 1)))
    booked = c.AppointmentBookedV1(
        patient_id=a, clinician_id=uuid.uuid4(), start=at, duration_minutes=30, reason="r"
    )
    batch = [
        reg_a,
        event(b, 1, 3, registered(date(1960, 1, 1))),
        event(a, 2, 4, c.PatientRemovedV1()),
        event(uuid.uuid4(), 1, 5, booked),
        reg_a,  # after her removal: changes nothing
        event(c2, 1, 6, c.Unreadable(sealed)),  # an erased patient's: no birth date
        event(d, 1, 7, registered(date(1970, 1, 1))),
        event(d, 1, 7, registered(date(1970, 1, 1))),  # twice in one run: inserted once
        reg_e,  # applied by the earlier batch
    ]
    suffix = uuid.uuid4().hex[:8]
    together, alone = (
        Tables(
            patients=f"analytics_patients_{kind}_{suffix}",
            appointments=f"analytics_appointments_{kind}_{suffix}",
            money=f"analytics_money_{kind}_{suffix}",
            positions=f"analytics_positions_{kind}_{suffix}",
            tracking=f"analytics_tracking_{kind}_{suffix}",
        )
        for kind in ("together", "alone")
    )
    live = Tables()
    async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
        await conn.set_autocommit(True)
        try:
            counts, facts = {}, {}
            for tables in (together, alone):
                for field in ("patients", "appointments", "money", "positions", "tracking"):
                    await conn.execute(
                        f"CREATE TABLE {getattr(tables, field)}"
                        f" (LIKE {getattr(live, field)} INCLUDING ALL)"
                    )
                projection = AnalyticsProjection(tables, name="mixed")
                await projection.apply(conn, [reg_e])
                outcomes = (
                    [await projection.apply(conn, batch)]
                    if tables is together
                    else [await projection.apply(conn, [one]) for one in batch]
                )
                counts[tables] = (sum(n for n, _ in outcomes), max(p for _, p in outcomes))
                facts[tables] = [
                    await (await conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2")).fetchall()
                    for table in (
                        tables.patients,
                        tables.positions,
                        f"(SELECT projection, position, applied FROM {tables.tracking}) t",
                    )
                ]
            assert counts[together] == counts[alone] == (len(batch), 7)
            assert facts[together] == facts[alone]
            patients = {r[0]: r for r in facts[together][0]}
            assert len(patients) == 5 and len(facts[together][1]) == 7
            assert patients[a][1] == 2 and patients[a][5] is not None  # removed, not re-added
            assert patients[c2][3:5] == (date(2025, 2, 1), None)
        finally:
            for tables in (together, alone):
                await conn.execute(
                    f"DROP TABLE IF EXISTS {tables.patients}, {tables.appointments},"
                    f" {tables.money}, {tables.positions}, {tables.tracking}"
                )
