"""Rate limits (429 + Retry-After), CORS and the docs, at the gateway."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from bench.loadgen import Connection
from domain.roles import Role
from ops.gateway.generate import LOGIN_ACCOUNT_PER_MINUTE, SUBJECT_RATE_PER_SECOND
from tests.e2e.conftest import GATEWAY, new_user, unique_email

pytestmark = pytest.mark.e2e


async def test_a_burst_from_one_subject_gets_429_with_retry_after(gateway, admin):
    user = await new_user(gateway, admin, Role.ANALYST)
    connections = [Connection(GATEWAY) for _ in range(20)]

    async def burst(connection: Connection) -> list[tuple[int, str | None]]:
        replies = []
        for _ in range(SUBJECT_RATE_PER_SECOND // 5):  # 20 x 40 = 4x the per-second limit
            reply = await connection.request("GET", "/api/patients?limit=1", user.headers)
            replies.append((reply.status, reply.headers.get("retry-after")))
        await connection.close()
        return replies

    replies = [r for batch in await asyncio.gather(*map(burst, connections)) for r in batch]
    statuses = Counter(status for status, _ in replies)
    assert set(statuses) == {200, 429}, statuses
    assert statuses[200] >= SUBJECT_RATE_PER_SECOND // 2
    assert {after for status, after in replies if status == 429} == {"1"}
    # The limit is the subject's own: another user is not slowed down.
    other = await new_user(gateway, admin, Role.ANALYST)
    assert (await gateway.get("/api/patients", headers=other.headers)).status_code == 200


async def test_logins_are_limited_per_account_much_more_strictly(gateway):
    email = unique_email("guess")
    statuses = []
    for _ in range(LOGIN_ACCOUNT_PER_MINUTE + 3):
        response = await gateway.post(
            "/auth/login", json={"email": email, "password": "guess-guess-guess"}
        )
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert response.headers["retry-after"] == "60"
    assert statuses[:LOGIN_ACCOUNT_PER_MINUTE] == [401] * LOGIN_ACCOUNT_PER_MINUTE
    assert statuses[-1] == 429
    # Someone else logging in from the same address is not locked out by it.
    other = await gateway.post(
        "/auth/login", json={"email": unique_email("other"), "password": "nope-nope-nope"}
    )
    assert other.status_code == 401


async def test_cors_preflight_and_headers(gateway, admin):
    origin = "http://localhost:3000"
    preflight = await gateway.options(
        "/api/patients",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == origin
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    listed = await gateway.get("/api/patients", headers={**admin.headers, "Origin": origin})
    assert listed.headers["access-control-allow-origin"] == origin
    assert "etag" in listed.headers["access-control-expose-headers"].lower()


@pytest.mark.parametrize("service", ["patients", "auth"])
async def test_each_services_openapi_is_served_with_gateway_paths(gateway, service):
    response = await gateway.get(f"/api-docs/{service}")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    prefix = "/api/" if service == "patients" else "/auth/"
    assert document["paths"]
    assert all(path.startswith(prefix) for path in document["paths"])
    guarded = [op for ops in document["paths"].values() for op in ops.values() if "x-roles" in op]
    assert guarded
    assert all(op["security"] == [{"bearer": []}] for op in guarded)


async def test_the_patients_document_has_reads_and_writes(gateway):
    paths = (await gateway.get("/api-docs/patients")).json()["paths"]
    assert {"get", "post"} <= set(paths["/api/patients"])
    assert {"get", "put", "delete"} <= set(paths["/api/patients/{patient_id}"])


async def test_a_page_browses_the_docs(gateway):
    page = await gateway.get("/api-docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "/api-docs/patients" in page.text or '"patients"' in page.text
    assert (await gateway.get("/api-docs/nothing")).status_code == 404
