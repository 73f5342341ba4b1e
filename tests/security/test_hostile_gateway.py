"""Hostile requests through the gateway, and straight to the real service processes behind
it: each gets a 4xx problem+json and writes nothing. tests/integration/test_hostile_input.py
sends the same input to the apps in-process; this sends it over HTTP, through HAProxy and
the services' own HTTP server, on the attack suite's isolated edge (tests/security/conftest.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from tests.support.revocation import Stack

pytestmark = pytest.mark.e2e

DEEP = b'{"name":' + b"[" * 5000 + b"]" * 5000 + b"}"
NOT_UTF8 = b'{"email":"\xff\xfe@example.org","password":"\xc3\x28"}'
PATIENT = "7a1c2b1e-0000-4000-8000-000000000001"
JSON = {"content-type": "application/json"}


@pytest.fixture(params=["gateway", "service"])
def via(request: pytest.FixtureRequest, edge: Stack) -> str:
    """`gateway`: the edge gateway's URL; `service`: each request goes to its service."""
    return str(request.param)


def url(edge: Stack, via: str, path: str) -> str:
    """The URL of a gateway path (/api/..., /auth/...), at the gateway or at its service."""
    if via == "gateway":
        assert edge.gateway is not None
        return f"{edge.gateway}{path}"
    if path.startswith("/auth/"):
        return f"{edge.auth}{path}"
    return f"{edge.commands}{path.removeprefix('/api')}"


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as http:
        yield http


def events_written(edge: Stack) -> int:
    with psycopg.connect(edge.settings.database_url) as conn:
        row = conn.execute("SELECT count(*) FROM carelog_events").fetchone()
    assert row is not None
    return int(row[0])


def problem(answer: httpx.Response, *statuses: int) -> dict[str, Any]:
    assert answer.status_code in statuses, (answer.status_code, answer.text[:500])
    assert answer.headers["content-type"].startswith("application/problem+json"), answer.text
    assert "Traceback" not in answer.text
    return dict(answer.json())


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/patients"),
        ("PUT", f"/api/patients/{PATIENT}"),
        ("POST", "/auth/login"),
        ("POST", "/auth/refresh"),
        ("POST", "/auth/users"),
    ],
)
def test_a_body_that_is_not_utf8_is_400(edge, via, client, edge_admin, method, path):
    before = events_written(edge)
    answer = client.request(
        method, url(edge, via, path), content=NOT_UTF8, headers={**JSON, **edge_admin}
    )
    problem(answer, 400)
    assert events_written(edge) == before


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/api/patients"), ("PUT", f"/api/patients/{PATIENT}"), ("POST", "/auth/login")],
)
def test_json_nested_5000_deep_is_400(edge, via, client, edge_admin, method, path):
    before = events_written(edge)
    answer = client.request(
        method, url(edge, via, path), content=DEEP, headers={**JSON, **edge_admin}
    )
    problem(answer, 400)
    assert events_written(edge) == before


@pytest.mark.parametrize(
    ("content_type", "raw"),
    [
        ("text/plain", b'{"name":"x"}'),
        ("application/x-www-form-urlencoded", b"name=x&email=y"),
        ("application/xml", b"<patient><name>x</name></patient>"),
    ],
)
@pytest.mark.parametrize("path", ["/api/patients", "/auth/login"])
def test_a_body_that_is_not_json_is_415(edge, via, client, edge_admin, path, content_type, raw):
    before = events_written(edge)
    answer = client.post(
        url(edge, via, path), content=raw, headers={"content-type": content_type, **edge_admin}
    )
    problem(answer, 415)
    assert events_written(edge) == before


def test_a_nul_in_the_login_email_is_4xx(edge, via, client):
    answer = client.post(
        url(edge, via, "/auth/login"),
        json={"email": "a\x00b@example.org", "password": "whatever-long-1"},
    )
    assert "token" not in problem(answer, 400, 401)


def test_a_nul_in_a_new_users_email_is_400(edge, via, client, edge_admin):
    email = f"x\x00{uuid.uuid4().hex[:8]}@example.org"
    answer = client.post(
        url(edge, via, "/auth/users"),
        json={"email": email, "password": "a-long-password-1", "role": "analyst"},
        headers=edge_admin,
    )
    problem(answer, 400)


def test_a_nul_in_the_users_cursor_is_400(edge, via, client, edge_admin):
    answer = client.get(url(edge, via, "/auth/users?after=%00"), headers=edge_admin)
    problem(answer, 400)


def test_a_100_kb_header_is_refused(edge, via, client, edge_admin):
    """The services answer 431 themselves. HAProxy refuses a header larger than its buffer
    (sized for the largest API document it serves) before any rule runs, with its own 400,
    as problem+json like every answer; a header that fits its buffer reaches the service."""
    before = events_written(edge)
    answer = client.post(
        url(edge, via, "/api/patients"),
        json={},
        headers={"x-padding": "a" * 100_000, **edge_admin},
    )
    if via == "service":
        problem(answer, 431)
    else:
        problem(answer, 400, 431)
    assert events_written(edge) == before
