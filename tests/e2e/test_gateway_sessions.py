"""Refresh rotation, reuse detection and logout, through the gateway."""

from __future__ import annotations

import pytest

from domain.roles import Role
from tests.e2e.conftest import new_user

pytestmark = pytest.mark.e2e


async def test_refresh_rotates_and_reuse_revokes_the_family(gateway, admin):
    user = await new_user(gateway, admin, Role.RECEPTIONIST)
    first = await gateway.post("/auth/refresh", json={"refreshToken": user.refresh_token})
    assert first.status_code == 200, first.text
    rotated = first.json()
    assert rotated["refreshToken"] != user.refresh_token
    listed = await gateway.get(
        "/api/patients", headers={"Authorization": f"Bearer {rotated['token']}"}
    )
    assert listed.status_code == 200

    replay = await gateway.post("/auth/refresh", json={"refreshToken": user.refresh_token})
    assert replay.status_code == 401
    successor = await gateway.post("/auth/refresh", json={"refreshToken": rotated["refreshToken"]})
    assert successor.status_code == 401


async def test_logout_kills_the_refresh_token(gateway, admin):
    user = await new_user(gateway, admin, Role.BILLING)
    body = {"refreshToken": user.refresh_token}
    assert (await gateway.post("/auth/logout", json=body)).status_code == 401
    out = await gateway.post("/auth/logout", json=body, headers=user.headers)
    assert out.status_code == 204
    assert (await gateway.post("/auth/refresh", json=body)).status_code == 401


async def test_a_disabled_user_cannot_log_in_or_refresh(gateway, admin):
    user = await new_user(gateway, admin, Role.CLINICIAN)
    disabled = await gateway.post(f"/auth/users/{user.id}/disable", headers=admin.headers)
    assert disabled.status_code == 200
    again = await gateway.post(
        "/auth/login", json={"email": user.email, "password": "correct horse battery staple"}
    )
    assert again.status_code == 401
    refresh = await gateway.post("/auth/refresh", json={"refreshToken": user.refresh_token})
    assert refresh.status_code == 401
    assert (await gateway.get("/auth/validate", headers=user.headers)).status_code == 401
