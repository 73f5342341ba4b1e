"""Revocation at the services: a disabled user's or a logged-out session's access token is
refused within 2 s by the command API, the query API and the auth service, even though each
has already verified (and cached) it; another session, and a new login after enabling, work.

Real processes (auth, commands, read-api) on a database of their own: the revocation
reaches each through PostgreSQL, as in production."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from auth.service import DEV_EMAIL, DEV_PASSWORD
from domain.roles import Role
from tests.support.revocation import Stack, revocation_stack, status_within
from tests.support.stack import Process, free_port

pytestmark = pytest.mark.integration

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with revocation_stack(tmp_path_factory.mktemp("revocation")) as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login(http: httpx.AsyncClient, stack: Stack, email: str, password: str) -> Any:
    response = await http.post(
        f"{stack.auth}/auth/login", json={"email": email, "password": password}
    )
    assert response.status_code == 200, response.text
    return response.json()


@dataclass
class Calls:
    """One guarded request to each service with a given token."""

    http: httpx.AsyncClient
    stack: Stack
    token: str

    async def query(self) -> httpx.Response:
        return await self.http.get(f"{self.stack.queries}/patients", headers=bearer(self.token))

    async def command(self) -> httpx.Response:
        # A patient that does not exist: 404 for a good token, never a change.
        url = f"{self.stack.commands}/patients/{uuid.uuid4()}"
        return await self.http.delete(url, headers=bearer(self.token))

    async def auth(self) -> httpx.Response:
        return await self.http.get(f"{self.stack.auth}/auth/validate", headers=bearer(self.token))

    async def accepted_everywhere(self) -> None:
        assert (await self.query()).status_code == 200
        assert (await self.command()).status_code == 404
        assert (await self.auth()).status_code == 200

    async def refused_everywhere_within_2s(self) -> None:
        for call in (self.query, self.command, self.auth):
            response = await status_within(call, 401)
            assert response.status_code == 401, (call.__name__, response.text)
            assert response.headers["content-type"].startswith("application/problem+json")


async def new_user(http: httpx.AsyncClient, stack: Stack, admin: str) -> tuple[str, str]:
    email = f"rv-{uuid.uuid4().hex[:12]}@example.org"
    created = await http.post(
        f"{stack.auth}/auth/users",
        json={"email": email, "password": PASSWORD, "role": Role.CLINICIAN.value},
        headers=bearer(admin),
    )
    assert created.status_code == 201, created.text
    return created.json()["id"], email


@pytest.fixture
async def admin(http: httpx.AsyncClient, stack: Stack) -> str:
    token: str = (await login(http, stack, DEV_EMAIL, DEV_PASSWORD))["token"]
    return token


async def test_disabling_a_user_refuses_their_cached_token_everywhere_within_2s(http, stack, admin):
    user_id, email = await new_user(http, stack, admin)
    old = Calls(http, stack, (await login(http, stack, email, PASSWORD))["token"])
    await old.accepted_everywhere()  # now verified and cached by every service

    disabled = await http.post(f"{stack.auth}/auth/users/{user_id}/disable", headers=bearer(admin))
    assert disabled.status_code == 200, disabled.text
    await old.refused_everywhere_within_2s()

    enabled = await http.post(f"{stack.auth}/auth/users/{user_id}/enable", headers=bearer(admin))
    assert enabled.status_code == 200, enabled.text
    fresh = Calls(http, stack, (await login(http, stack, email, PASSWORD))["token"])
    await fresh.accepted_everywhere()
    assert (await old.query()).status_code == 401, "enabling must not bring old tokens back"


async def test_logout_refuses_that_sessions_token_but_not_another_sessions(http, stack, admin):
    _, email = await new_user(http, stack, admin)
    first = await login(http, stack, email, PASSWORD)
    second = await login(http, stack, email, PASSWORD)
    ended, kept = Calls(http, stack, first["token"]), Calls(http, stack, second["token"])
    await ended.accepted_everywhere()
    await kept.accepted_everywhere()

    out = await http.post(
        f"{stack.auth}/auth/logout",
        json={"refreshToken": first["refreshToken"]},
        headers=bearer(first["token"]),
    )
    assert out.status_code == 204, out.text
    await ended.refused_everywhere_within_2s()
    await kept.accepted_everywhere()


async def test_a_service_started_after_a_revocation_loads_it(http, stack, admin, tmp_path: Path):
    """The full load on (re)connect: a revocation announced before a process listened counts."""
    user_id, email = await new_user(http, stack, admin)
    token = (await login(http, stack, email, PASSWORD))["token"]
    disabled = await http.post(f"{stack.auth}/auth/users/{user_id}/disable", headers=bearer(admin))
    assert disabled.status_code == 200
    settings = stack.settings.with_(ports={**stack.settings.ports, "read-api": free_port()})
    env = {"CARELOG_JWKS_URL": settings.jwks_url}
    late = Process(["serve", "read-api"], settings, "read-api", tmp_path / "late", env=env).start()
    try:
        url = f"http://127.0.0.1:{settings.ports['read-api']}/patients"
        assert (await http.get(url, headers=bearer(token))).status_code == 401
    finally:
        late.stop()


async def test_disabling_again_at_once_refuses_the_token_of_the_login_in_between(
    http, stack, admin
):
    """Disable, enable, log in and disable again, all likely within one second: the second
    cutoff still covers the token the login in between was issued."""
    user_id, email = await new_user(http, stack, admin)
    for action in ("disable", "enable"):
        done = await http.post(f"{stack.auth}/auth/users/{user_id}/{action}", headers=bearer(admin))
        assert done.status_code == 200, done.text
    between = Calls(http, stack, (await login(http, stack, email, PASSWORD))["token"])
    await between.accepted_everywhere()
    again = await http.post(f"{stack.auth}/auth/users/{user_id}/disable", headers=bearer(admin))
    assert again.status_code == 200, again.text
    await between.refused_everywhere_within_2s()
