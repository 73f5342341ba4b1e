"""Input nobody should send gets a 4xx with a problem+json body, never a 500, and changes
nothing: NUL characters, bytes that are not UTF-8, JSON nested thousands deep, bodies
that are not JSON, and oversized headers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from auth.app import create_app as auth_app
from commands.api import create_app as commands_app
from commands.store import EventStore
from domain.roles import Role
from runtime.settings import Settings
from tests.support.patients import body
from tests.support.tokens import TestTokens

pytestmark = pytest.mark.integration

DEEP = b'{"name":' + b"[" * 5000 + b"]" * 5000 + b"}"
NOT_UTF8 = b'{"name":"\xff\xfe"}'


@pytest.fixture
async def commands(
    settings: Settings, store: EventStore, tokens: TestTokens
) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(app=commands_app(settings, store, tokens.verifier)) as client:
        client.headers.update(tokens.headers(Role.ADMIN))
        yield client


@pytest.fixture
async def auth(settings: Settings, tokens: TestTokens) -> AsyncIterator[AsyncTestClient[Any]]:
    async with AsyncTestClient(app=auth_app(settings, tokens.settings, tokens.ring)) as client:
        yield client


def problem_of(answer: Any, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert "Traceback" not in answer.text
    return dict(answer.json())


@pytest.mark.parametrize("raw", [DEEP, NOT_UTF8], ids=["deep", "not-utf8"])
@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_deep_or_undecodable_bodies_are_400_and_write_nothing(commands, store, raw, method):
    before = store.recorder.max_notification_id()
    path = "/patients" if method == "POST" else "/patients/7a1c2b1e-0000-4000-8000-000000000001"
    answer = await commands.request(
        method, path, content=raw, headers={"content-type": "application/json"}
    )
    assert "body" in problem_of(answer, 400)["errors"]
    assert store.recorder.max_notification_id() == before


async def test_a_nul_in_a_patient_field_is_400(commands):
    answer = await commands.post("/patients", json=body(name="Ada\x00Lovelace"))
    assert "name" in problem_of(answer, 400)["errors"]


@pytest.mark.parametrize(
    ("content_type", "raw"),
    [
        ("text/plain", b'{"name":"x"}'),
        ("application/x-www-form-urlencoded", b"name=x&email=y"),
        ("application/xml", b"<patient><name>x</name></patient>"),
    ],
)
async def test_bodies_that_are_not_json_are_415(commands, auth, content_type, raw):
    for client, path in ((commands, "/patients"), (auth, "/auth/login")):
        answer = await client.post(path, content=raw, headers={"content-type": content_type})
        problem_of(answer, 415)


async def test_an_oversized_header_is_431(commands):
    answer = await commands.get("/health/live", headers={"x-padding": "a" * 100_000})
    problem_of(answer, 431)


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/auth/login", {"email": "a\x00b@example.org", "password": "whatever-long-1"}),
        ("/auth/refresh", {"refreshToken": "abc\x00def"}),
    ],
)
async def test_nul_characters_at_the_auth_service_are_4xx(auth, path, payload):
    answer = await auth.post(path, json=payload)
    assert answer.status_code in (400, 401), answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert "token" not in answer.json()


async def test_nul_characters_when_creating_users_and_in_queries_are_400(auth, tokens):
    admin = tokens.headers(Role.ADMIN)
    created = await auth.post(
        "/auth/users",
        json={"email": "x\x00y@example.org", "password": "a-long-password-1", "role": "analyst"},
        headers=admin,
    )
    problem_of(created, 400)
    listed = await auth.get("/auth/users", params={"after": "\x00"}, headers=admin)
    problem_of(listed, 400)


@pytest.mark.parametrize("path", ["/auth/login", "/auth/refresh", "/auth/users"])
async def test_undecodable_bodies_at_the_auth_service_are_400(auth, tokens, path):
    answer = await auth.post(
        path,
        content=NOT_UTF8,
        headers={"content-type": "application/json", **tokens.headers(Role.ADMIN)},
    )
    problem_of(answer, 400)


async def test_an_options_request_names_the_allowed_methods(commands, auth):
    """Litestar answers OPTIONS with a handler of its own, which the query check must take."""
    for client, path, method in (
        (commands, "/patients", "POST"),
        (commands, "/patients/7a1c2b1e-0000-4000-8000-000000000001", "PUT"),
        (auth, "/auth/users", "POST"),
    ):
        answer = await client.options(path)
        assert answer.status_code == 204, answer.text
        assert method in answer.headers["allow"]
