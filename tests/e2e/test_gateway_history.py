"""A patient's history through the gateway, written and read by real users of each role.

The stack is this module's own (auth, command and query APIs, relay, directory
projection and a gateway, on an isolated database and topic prefix): the history's
actors are the users the auth service created, as their tokens name them.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from auth.service import DEV_EMAIL, DEV_PASSWORD
from domain.roles import Role
from tests.support.patients import body
from tests.support.revocation import Stack, projected_stack
from tests.support.stack import eventually

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    home: Path = tmp_path_factory.mktemp("gateway-history")
    with projected_stack(home) as up:
        yield up


@pytest.fixture
async def gateway(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    assert stack.gateway is not None
    async with httpx.AsyncClient(base_url=stack.gateway, timeout=10) as client:
        yield client


async def signed_in(gateway: httpx.AsyncClient, admin: dict[str, str], role: Role) -> Any:
    """A new user of `role`: (their id, headers with their own access token)."""
    email = f"hist-{uuid.uuid4().hex[:12]}@example.org"
    user = {"email": email, "password": PASSWORD, "role": role.value}
    created = await gateway.post("/auth/users", json=user, headers=admin)
    assert created.status_code == 201, created.text
    login = await gateway.post("/auth/login", json={"email": email, "password": PASSWORD})
    assert login.status_code == 200, login.text
    return created.json()["id"], {"Authorization": f"Bearer {login.json()['token']}"}


async def test_history_names_the_users_who_acted_and_shows_values_by_role(gateway):
    login = await gateway.post("/auth/login", json={"email": DEV_EMAIL, "password": DEV_PASSWORD})
    admin = {"Authorization": f"Bearer {login.json()['token']}"}
    receptionist, as_receptionist = await signed_in(gateway, admin, Role.RECEPTIONIST)
    clinician, as_clinician = await signed_in(gateway, admin, Role.CLINICIAN)

    first = body(name="Gateway Before")
    created = await gateway.post("/api/patients", json=first, headers=as_receptionist)
    assert created.status_code == 201, created.text
    patient = created.json()["id"]
    changed = await gateway.put(
        f"/api/patients/{patient}", json=first | {"name": "Gateway After"}, headers=as_clinician
    )
    assert changed.status_code == 200, changed.text
    path = f"/api/patients/{patient}/history"

    async def both_entries() -> Any:
        answer = await gateway.get(path, headers=admin)
        entries = answer.json().get("entries", []) if answer.status_code == 200 else []
        return entries if len(entries) == 2 else None

    entries = await eventually(both_entries, timeout=30)
    assert [(e["actor"]["userId"], e["actor"]["role"]) for e in entries] == [
        (receptionist, "receptionist"),
        (clinician, "clinician"),
    ]
    assert entries[1]["fields"] == ["name"]
    assert entries[1]["values"] == {"name": "Gateway After"}

    as_clinician_reads = await gateway.get(path, headers=as_clinician)
    assert as_clinician_reads.status_code == 200, as_clinician_reads.text
    assert [e["fields"] for e in as_clinician_reads.json()["entries"]][1] == ["name"]
    assert "Gateway" not in as_clinician_reads.text
    refused = await gateway.get(path, headers=as_receptionist)
    assert refused.status_code == 403
    assert (await gateway.get(path)).status_code == 401
    unknown = await gateway.get(f"/api/patients/{uuid.uuid4()}/history", headers=admin)
    assert unknown.status_code == 404
    assert unknown.headers["content-type"].startswith("application/problem+json")
