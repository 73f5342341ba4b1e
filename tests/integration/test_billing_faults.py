"""Billing killed mid-flow (SIGKILL, no goodbye): still exactly one account per patient,
and every billing event it committed reaches `billing.events`."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest

from domain.billing import BILLING_STREAM, account_id_for, decode_billing_event
from domain.contracts import PATIENT_STREAM, Envelope
from runtime.kafka import reliable_producer
from runtime.settings import Settings
from tests.support.billing import publish, registered
from tests.support.stack import Process, eventually, isolated_settings, read_topic

pytestmark = [pytest.mark.integration, pytest.mark.fault]

ROUNDS = 3
PER_ROUND = 120


async def counts(settings: Settings) -> tuple[int, int, int]:
    """(accounts, outbox rows, outbox rows not yet published)."""
    async with await psycopg.AsyncConnection.connect(settings.database_url) as db:
        exists = await (await db.execute("SELECT to_regclass('billing.outbox')")).fetchone()
        if exists is None or exists[0] is None:
            return 0, 0, 0
        row = await (
            await db.execute(
                "SELECT (SELECT count(*) FROM billing.accounts), count(*),"
                " count(*) FILTER (WHERE published_at IS NULL) FROM billing.outbox"
            )
        ).fetchone()
    assert row is not None
    return row[0], row[1], row[2]


async def steadily(producer: Any, topic: str, envelopes: list[Envelope[Any]]) -> None:
    """Publishes a few at a time, so the kill lands while events keep arriving."""
    for start in range(0, len(envelopes), 4):
        await publish(producer, topic, *envelopes[start : start + 4])
        await asyncio.sleep(0.02)


async def test_a_killed_billing_process_keeps_one_account_per_patient(tmp_path: Path):
    with isolated_settings("kb") as settings:
        topic = settings.topic(PATIENT_STREAM)
        billing = Process(["serve", "billing"], settings, "billing-http", tmp_path / "billing")
        await asyncio.to_thread(billing.start)
        producer = reliable_producer(settings)
        await producer.start()
        patients = [registered() for _ in range(ROUNDS * PER_ROUND)]
        try:
            for round_ in range(ROUNDS):
                batch = patients[round_ * PER_ROUND : (round_ + 1) * PER_ROUND]
                sending = asyncio.create_task(steadily(producer, topic, batch))
                floor = round_ * PER_ROUND + PER_ROUND // 5

                async def some_opened(floor: int = floor) -> bool:
                    return (await counts(settings))[0] >= floor

                await eventually(some_opened, timeout=60)
                billing.kill()  # mid-batch: events keep arriving while it is down
                await sending
                # Redelivery on top: some of this round's events a second time.
                await publish(producer, topic, *batch[: PER_ROUND // 4])
                await asyncio.to_thread(billing.start)

            async def settled() -> tuple[int, int, int] | None:
                now = await counts(settings)
                return now if now[0] == len(patients) and now[2] == 0 else None

            accounts, events, _ = await eventually(settled, timeout=90)
        finally:
            billing.stop()
            await producer.stop()

        async with await psycopg.AsyncConnection.connect(settings.database_url) as db:
            rows = await (
                await db.execute("SELECT patient_id, id FROM billing.accounts")
            ).fetchall()
        per_patient = Counter(patient for patient, _ in rows)
        assert set(per_patient) == {p.aggregate_id for p in patients}
        assert max(per_patient.values()) == 1
        assert all(account == account_id_for(patient) for patient, account in rows)
        assert accounts == len(patients)
        assert events == len(patients)  # one BillingAccountOpened each, never two

        records = await read_topic(settings, settings.topic(BILLING_STREAM), events, timeout=60)
        published = Counter()
        for record in records:
            envelope, data = decode_billing_event(record.value)
            assert envelope.type == "BillingAccountOpened"
            assert record.key == str(envelope.aggregate_id).encode()
            published[data.patient_id] += 1
        # At least once: every committed event is on the topic; a resend may repeat one.
        assert set(published) == {p.aggregate_id for p in patients}
