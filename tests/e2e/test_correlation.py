"""One correlation id from the HTTP request to the event, its Kafka header, billing's event
and the log lines written for it, on the running stack."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import pytest

from domain import contracts
from domain.roles import Role
from tests.e2e.conftest import new_user
from tests.support.patients import body
from tests.support.stack import ROOT, base_settings, eventually, read_topic

pytestmark = pytest.mark.e2e


async def _records_about(topic: str, marker: str) -> list[Any]:
    settings = base_settings()
    records = await read_topic(settings, settings.topic(topic), expected=10**9, timeout=3)
    return [r for r in records if marker.encode() in r.value]


async def test_a_request_id_follows_the_patient_to_kafka_billing_and_the_logs(gateway, admin):
    receptionist = await new_user(gateway, admin, Role.RECEPTIONIST)
    correlation = f"e2e-{uuid.uuid4().hex}"
    created = await gateway.post(
        "/api/patients",
        json=body(name="Traced Patient"),
        headers={**receptionist.headers, "X-Correlation-ID": correlation},
    )
    assert created.status_code == 201, created.text
    assert created.headers["x-correlation-id"] == correlation
    patient_id = created.json()["id"]

    published = await eventually(
        lambda: _records_about(contracts.PATIENT_STREAM, patient_id), timeout=30
    )
    (record,) = published
    headers = {k: v.decode() for k, v in record.headers}
    assert headers["correlation-id"] == correlation
    assert msgspec.json.decode(record.value)["correlationId"] == correlation

    opened = await eventually(lambda: _records_about("billing.events", patient_id), timeout=30)
    assert {dict(r.headers)["correlation-id"].decode() for r in opened} == {correlation}

    log = ROOT / ".stack" / "logs" / "commands.log"
    lines = [line for line in log.read_text().splitlines() if correlation in line]
    assert any("patient registered" in line for line in lines)
