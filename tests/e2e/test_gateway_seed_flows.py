"""The seed's two client flows, unchanged, through the gateway."""

from __future__ import annotations

import uuid

import pytest

from tests.support.patients import body

pytestmark = pytest.mark.e2e


async def test_a_valid_login_gives_a_token_and_the_patient_list(gateway):
    login = await gateway.post(
        "/auth/login", json={"email": "testuser@test.com", "password": "password123"}
    )
    assert login.status_code == 200
    token = login.json()["token"]
    assert token
    headers = {"Authorization": f"Bearer {token}"}
    name = f"Seed Flow {uuid.uuid4().hex[:12]}"
    created = await gateway.post("/api/patients", json=body(name=name), headers=headers)
    assert created.status_code == 201, created.text
    patient_id = created.json()["id"]
    patients = await gateway.get(
        "/api/patients",
        params={"name": name, "minPosition": created.headers["Event-Position"]},
        headers=headers,
    )
    assert patients.status_code == 200, patients.text
    listed = patients.json()["patients"]
    assert isinstance(listed, list)
    assert patient_id in {p["id"] for p in listed}


async def test_an_invalid_login_is_401(gateway):
    login = await gateway.post(
        "/auth/login", json={"email": "invalid_user@test.com", "password": "wrongpassword"}
    )
    assert login.status_code == 401


async def test_validate_answers_200_with_a_token_and_401_without(gateway, admin):
    assert (await gateway.get("/auth/validate", headers=admin.headers)).status_code == 200
    assert (await gateway.get("/auth/validate")).status_code == 401
