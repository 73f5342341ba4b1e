"""The whole role matrix, through the gateway, with real users of each role."""

from __future__ import annotations

import uuid

import httpx
import pytest

from domain.roles import PATIENT_READERS, PATIENT_WRITERS, USER_ADMINS, Role
from tests.e2e.conftest import PASSWORD, User, new_user, unique_email
from tests.support.patients import body

pytestmark = pytest.mark.e2e


def requests(target: str) -> list[tuple[str, str, dict | None, frozenset[Role]]]:
    """(method, path, JSON body, roles admitted) for every guarded endpoint.

    `target` is a user id the user endpoints act on; the patient paths name an id
    that does not exist, so an admitted write answers 404, never changing data.
    """
    patient = f"/api/patients/{uuid.uuid4()}"
    return [
        ("GET", "/api/patients", None, PATIENT_READERS),
        ("GET", patient, None, PATIENT_READERS),
        ("POST", "/api/patients", body(), PATIENT_WRITERS),
        ("PUT", patient, body(), PATIENT_WRITERS),
        ("DELETE", patient, None, PATIENT_WRITERS),
        (
            "POST",
            "/auth/users",
            {"email": unique_email(), "password": PASSWORD, "role": "analyst"},
            USER_ADMINS,
        ),
        ("GET", "/auth/users", None, USER_ADMINS),
        ("GET", f"/auth/users/{target}", None, USER_ADMINS),
        ("PUT", f"/auth/users/{target}/role", {"role": "analyst"}, USER_ADMINS),
        ("POST", f"/auth/users/{target}/disable", None, USER_ADMINS),
        ("POST", f"/auth/users/{target}/enable", None, USER_ADMINS),
        ("GET", "/auth/validate", None, frozenset(Role)),
    ]


@pytest.mark.parametrize("role", list(Role))
async def test_each_role_gets_exactly_what_the_matrix_says(gateway, admin, role):
    user: User = await new_user(gateway, admin, role)
    target = await new_user(gateway, admin, Role.ANALYST)
    refused, admitted = [], []
    for method, path, payload, roles in requests(target.id):
        response = await gateway.request(method, path, json=payload, headers=user.headers)
        if role in roles:
            assert response.status_code not in (401, 403), (method, path, response.text)
            admitted.append((method, path))
        else:
            assert response.status_code == 403, (method, path, response.status_code)
            refused.append((method, path))
    assert admitted, "every role may do something"


async def test_an_analyst_reads_patients_but_cannot_write_them(gateway: httpx.AsyncClient, admin):
    analyst = await new_user(gateway, admin, Role.ANALYST)
    assert (await gateway.get("/api/patients", headers=analyst.headers)).status_code == 200
    write = await gateway.post("/api/patients", json=body(), headers=analyst.headers)
    assert write.status_code == 403
