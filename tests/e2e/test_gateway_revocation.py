"""Revocation at the gateway: HAProxy itself refuses a disabled user's or a logged-out
session's access token within 2 s, from maps its watcher keeps current.

The gateway is one of this module's own (HAProxy with its watcher, on a free port, over an
isolated auth service and APIs): the shared gateway is never reloaded."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from auth.service import DEV_EMAIL, DEV_PASSWORD
from domain.roles import Role
from ops.gateway.generate import REVOKED_SESSIONS
from tests.support.revocation import Stack, revocation_stack, status_within

pytestmark = pytest.mark.e2e

PASSWORD = "correct horse battery staple"
REFUSED_AT_THE_GATEWAY = "a valid bearer token is required"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with revocation_stack(tmp_path_factory.mktemp("gateway-revocation"), gateway=True) as up:
        yield up


@pytest.fixture
async def gateway(stack: Stack) -> AsyncIterator[httpx.AsyncClient]:
    assert stack.gateway is not None
    async with httpx.AsyncClient(base_url=stack.gateway, timeout=10) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login(gateway: httpx.AsyncClient, email: str, password: str) -> Any:
    response = await gateway.post("/auth/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture
async def admin(gateway: httpx.AsyncClient) -> str:
    token: str = (await login(gateway, DEV_EMAIL, DEV_PASSWORD))["token"]
    return token


async def new_user(gateway: httpx.AsyncClient, admin: str) -> tuple[str, str]:
    email = f"gw-{uuid.uuid4().hex[:12]}@example.org"
    created = await gateway.post(
        "/auth/users",
        json={"email": email, "password": PASSWORD, "role": Role.RECEPTIONIST.value},
        headers=bearer(admin),
    )
    assert created.status_code == 201, created.text
    return created.json()["id"], email


async def refused_by_the_gateway_within_2s(gateway: httpx.AsyncClient, token: str) -> None:
    response = await status_within(
        lambda: gateway.get("/api/patients", headers=bearer(token)), 401, REFUSED_AT_THE_GATEWAY
    )
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"].startswith("Bearer")
    # The gateway's own answer (the services behind it word theirs differently).
    assert response.json()["detail"] == REFUSED_AT_THE_GATEWAY


async def test_a_disabled_users_token_is_refused_at_the_gateway_within_2s(gateway, admin):
    user_id, email = await new_user(gateway, admin)
    token = (await login(gateway, email, PASSWORD))["token"]
    assert (await gateway.get("/api/patients", headers=bearer(token))).status_code == 200

    disabled = await gateway.post(f"/auth/users/{user_id}/disable", headers=bearer(admin))
    assert disabled.status_code == 200, disabled.text
    await refused_by_the_gateway_within_2s(gateway, token)

    enabled = await gateway.post(f"/auth/users/{user_id}/enable", headers=bearer(admin))
    assert enabled.status_code == 200, enabled.text
    fresh = (await login(gateway, email, PASSWORD))["token"]
    assert (await gateway.get("/api/patients", headers=bearer(fresh))).status_code == 200
    assert (await gateway.get("/api/patients", headers=bearer(token))).status_code == 401


async def test_logout_revokes_that_session_at_the_gateway_but_not_another(gateway, admin):
    _, email = await new_user(gateway, admin)
    first = await login(gateway, email, PASSWORD)
    second = await login(gateway, email, PASSWORD)
    for session in (first, second):
        listed = await gateway.get("/api/patients", headers=bearer(session["token"]))
        assert listed.status_code == 200

    out = await gateway.post(
        "/auth/logout",
        json={"refreshToken": first["refreshToken"]},
        headers=bearer(first["token"]),
    )
    assert out.status_code == 204, out.text
    await refused_by_the_gateway_within_2s(gateway, first["token"])
    kept = await gateway.get("/api/patients", headers=bearer(second["token"]))
    assert kept.status_code == 200


async def test_a_reloaded_gateway_still_refuses_from_its_map_file(stack, gateway, admin):
    _, email = await new_user(gateway, admin)
    session = await login(gateway, email, PASSWORD)
    out = await gateway.post(
        "/auth/logout",
        json={"refreshToken": session["refreshToken"]},
        headers=bearer(session["token"]),
    )
    assert out.status_code == 204
    await refused_by_the_gateway_within_2s(gateway, session["token"])
    sid = jwt.decode(session["token"], options={"verify_signature": False})["sid"]
    assert f"{sid} 1" in (Path(stack.settings.gateway_dir) / REVOKED_SESSIONS).read_text()

    assert stack.gateway_process is not None
    os.kill(stack.gateway_process.pid, signal.SIGUSR2)  # this module's own HAProxy only
    for _ in range(20):  # across the reload: the new workers start from the map files
        response = await gateway.get("/api/patients", headers=bearer(session["token"]))
        assert response.status_code == 401, response.text
