"""E2E fixtures: a client of the gateway on :4004 of the running stack, and its users."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from auth.config import AuthSettings
from auth.keys import KeyRing
from auth.service import DEV_EMAIL, DEV_PASSWORD
from domain.roles import Role

GATEWAY = os.environ.get("CARELOG_GATEWAY_URL", "http://127.0.0.1:4004")
PASSWORD = "correct horse battery staple"


@dataclass
class User:
    id: str
    email: str
    role: Role
    token: str
    refresh_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def unique_email(kind: str = "user") -> str:
    return f"{kind}-{uuid.uuid4().hex[:12]}@example.org"


@pytest.fixture
async def gateway() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=GATEWAY, timeout=30) as client:
        yield client


async def login(client: httpx.AsyncClient, email: str, password: str) -> dict[str, Any]:
    response = await client.post("/auth/login", json={"email": email, "password": password})
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="session")
async def admin() -> User:
    """The development admin, logged in once for the session (logins are rate-limited)."""
    async with httpx.AsyncClient(base_url=GATEWAY, timeout=30) as client:
        session = await login(client, DEV_EMAIL, DEV_PASSWORD)
        validity = await client.get(
            "/auth/validate", headers={"Authorization": f"Bearer {session['token']}"}
        )
    return User(
        validity.json()["subject"],
        DEV_EMAIL,
        Role.ADMIN,
        session["token"],
        session["refreshToken"],
    )


async def new_user(client: httpx.AsyncClient, admin: User, role: Role) -> User:
    """A fresh user of `role`, created by the admin and logged in."""
    email = unique_email(role.value)
    created = await client.post(
        "/auth/users",
        json={"email": email, "password": PASSWORD, "role": role.value},
        headers=admin.headers,
    )
    assert created.status_code == 201, created.text
    session = await login(client, email, PASSWORD)
    return User(created.json()["id"], email, role, session["token"], session["refreshToken"])


@pytest.fixture(scope="session")
def signing_key() -> tuple[Any, AuthSettings]:
    """The stack's own signing key (development key directory), to forge near-valid tokens."""
    auth = AuthSettings.from_env({**os.environ, "CARELOG_ENV": "development"})
    ring = KeyRing(auth.keys_dir).ensure(development=False)
    return ring.current, auth
