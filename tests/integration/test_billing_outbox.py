"""Billing's outbox publisher waits for the outbox's announcement, not a timer: idle, it
reads the table about once a second; an insert wakes it at once (on the real PostgreSQL,
in a database of this test's own)."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime

import psycopg
import pytest

from billing_grpc.outbox import WAIT_SECONDS, BillingOutbox
from runtime.settings import Settings

pytestmark = pytest.mark.integration


async def test_the_publisher_waits_for_an_insert_into_the_outbox(own_settings: Settings):
    source = BillingOutbox(own_settings.database_url, "billing", own_settings.topic("billing"))
    await source.open()
    try:
        started = time.monotonic()
        await source.wait()  # nothing is inserted: it waits it out
        assert time.monotonic() - started >= WAIT_SECONDS * 0.9

        waiting = asyncio.ensure_future(source.wait())
        await asyncio.sleep(0.1)
        assert not waiting.done()
        inserted = time.monotonic()
        async with await psycopg.AsyncConnection.connect(own_settings.database_url) as conn:
            await conn.execute(
                "INSERT INTO billing.outbox (aggregate_id, aggregate_version, type,"
                " schema_version, payload, occurred_at) VALUES (%s, 1, 'test', 1, '{}', %s)",
                [uuid.uuid4(), datetime.now(UTC)],
            )
        await asyncio.wait_for(waiting, timeout=WAIT_SECONDS)
        assert time.monotonic() - inserted < WAIT_SECONDS / 2
    finally:
        await source.close()
