"""Patients CRUD through the gateway, with a token, as a seed client does it."""

from __future__ import annotations

import uuid

import pytest

from domain.roles import Role
from tests.e2e.conftest import new_user
from tests.support.patients import body

pytestmark = pytest.mark.e2e


async def test_register_read_change_and_remove_a_patient(gateway, admin):
    clinician = await new_user(gateway, admin, Role.CLINICIAN)
    headers = clinician.headers
    created = await gateway.post("/api/patients", json=body(name="Grace Hopper"), headers=headers)
    assert created.status_code == 201, created.text
    patient = created.json()
    location = created.headers["location"]
    assert location == f"/api/patients/{patient['id']}"
    assert created.headers["x-correlation-id"]

    read = await gateway.get(location, params={"minPosition": patient["position"]}, headers=headers)
    assert read.status_code == 200, read.text
    assert read.json()["name"] == "Grace Hopper"

    change = body(name="Grace B. Hopper", email=patient["email"])
    changed = await gateway.put(location, json=change, headers={**headers, "If-Match": '"1"'})
    assert changed.status_code == 200, changed.text
    position = changed.json()["position"]
    listed = await gateway.get(
        "/api/patients",
        params={"name": "Grace B.", "minPosition": position, "limit": 200},
        headers=headers,
    )
    assert listed.status_code == 200
    assert patient["id"] in {p["id"] for p in listed.json()["patients"]}

    removed = await gateway.delete(location, headers=headers)
    assert removed.status_code == 204
    gone = await gateway.get(
        location, params={"minPosition": int(removed.headers["event-position"])}, headers=headers
    )
    assert gone.status_code == 404


async def test_errors_from_the_services_pass_through(gateway, admin):
    bad = await gateway.post("/api/patients", json=body(name=""), headers=admin.headers)
    assert bad.status_code == 400
    assert "name" in bad.json()["errors"]
    missing = await gateway.get(f"/api/patients/{uuid.uuid4()}", headers=admin.headers)
    assert missing.status_code == 404


async def test_an_oversized_body_is_413_at_the_gateway(gateway, admin):
    response = await gateway.post(
        "/api/patients", json=body(address="x" * 70_000), headers=admin.headers
    )
    assert response.status_code == 413
    assert "uvicorn" not in response.headers.get("server", "")


async def test_other_methods_and_paths_are_refused(gateway, admin):
    patch = await gateway.patch("/api/patients", json={}, headers=admin.headers)
    assert patch.status_code == 405
    assert (await gateway.get("/health/ready")).status_code == 200
    assert (await gateway.get("/metrics")).status_code == 404
    assert (await gateway.get("/patients", headers=admin.headers)).status_code == 404
