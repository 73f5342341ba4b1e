"""The disclosure audit through the gateway: `/api/audit` is routed to the query API and
admits admins only, and a read through the gateway is recorded under the correlation id
the gateway gave it.

The gateway is one of the test's own (rendered by `carelog gateway-config`'s code, trusting
the stack's published keys) in front of a query API process on the test session's own
database; its users are real ones of the stack's auth service.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from auth.config import AuthSettings
from bootstrap.gateway import write_config
from domain.roles import Role
from runtime.settings import Settings
from tests.e2e.conftest import new_user
from tests.e2e.test_gateway_limits import gateway_port, running_gateway
from tests.support.stack import Process, base_settings

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def audited_gateway(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A gateway whose query upstream is a query API on this session's database."""
    auth = AuthSettings.from_env({**os.environ, "CARELOG_ENV": "development"})
    out = tmp_path_factory.mktemp("audit-gateway")
    queries = Process(["serve", "read-api"], settings, "read-api", Path(out) / "read-api").start()
    base = base_settings()
    own = base.with_(
        gateway_dir=str(out),
        gateway_port=gateway_port(),
        ports={**base.ports, "read-api": settings.ports["read-api"]},
    )
    try:
        with running_gateway(write_config(own, auth, base.jwks_url), own.gateway_port) as url:
            yield url
    finally:
        queries.stop()


def a_patient(settings: Settings) -> uuid.UUID:
    """A directory row of its own, written as the projection would."""
    patient = uuid.uuid4()
    with psycopg.connect(settings.database_url) as conn:
        conn.execute(
            "INSERT INTO directory_patients (id, version, position, name, name_key, email,"
            " email_key, address, date_of_birth, registered_date)"
            " VALUES (%s, 1, 1, 'Gate Audit', 'gate audit', %s, %s, '1 Gate Rd',"
            " '1980-01-01', '2024-01-02')",
            [patient, f"{patient}@example.org", f"{patient}@example.org"],
        )
    return patient


async def test_a_read_through_the_gateway_is_recorded_and_only_admins_read_the_audit(
    audited_gateway, settings, gateway, admin
):
    patient = a_patient(settings)
    users = {role: await new_user(gateway, admin, role) for role in Role if role != Role.ADMIN}
    reader = users[Role.CLINICIAN]
    async with httpx.AsyncClient(base_url=audited_gateway, timeout=30) as own:
        read = await own.get(f"/api/patients/{patient}", headers=reader.headers)
        assert read.status_code == 200 and read.json()["name"] == "Gate Audit"
        correlation = read.headers["x-correlation-id"]
        listed = await own.get(
            "/api/audit", params={"patientId": str(patient)}, headers=admin.headers
        )
        assert listed.status_code == 200, listed.text
        (record,) = listed.json()["records"]
        assert (record["actorId"], record["role"], record["operation"]) == (
            reader.id,
            "clinician",
            "patient.get",
        )
        assert record["patientIds"] == [str(patient)]
        assert record["correlationId"] == correlation
        for role, user in users.items():
            assert (await own.get("/api/audit", headers=user.headers)).status_code == 403, role
        assert (await own.get("/api/audit")).status_code == 401
