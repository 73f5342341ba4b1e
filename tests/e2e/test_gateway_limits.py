"""Rate limits (429 + Retry-After), CORS and the docs, at the gateway.

Most tests use the stack's gateway on :4004. Those that need another configuration
(a low rate limit, the development CORS default) run a gateway of their own: HAProxy
with a config rendered by `carelog gateway-config`'s code into a temporary directory,
on free ports, in front of the stack's services and trusting the stack's keys.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from auth.tokens import issue_access_token
from bench.loadgen import Connection
from bootstrap.gateway import write_config
from domain.roles import Role
from ops.gateway.generate import (
    LOGIN_ACCOUNT_PER_MINUTE,
    SUBJECT_RATE_PER_SECOND,
    Limits,
    haproxy_binary,
)
from runtime.settings import DEV_CORS_ORIGINS
from tests.e2e.conftest import GATEWAY, new_user, unique_email
from tests.support.stack import base_settings, free_port, stop_group

pytestmark = pytest.mark.e2e

THROTTLED_RATE = 20
"""The per-subject limit of the test's own gateway: low, so the stack's services keep up."""
RUN_SECONDS = 3.0
CONNECTIONS = 16


def gateway_port() -> int:
    """A free port whose metrics neighbour (port + 20) is free too."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.create_server(("127.0.0.1", port + 20)):
                return port
        except OSError:
            continue
    raise RuntimeError("no free pair of ports for a gateway")


@contextmanager
def running_gateway(config: Path, port: int) -> Iterator[str]:
    """HAProxy on a rendered config of the test's own, until the block ends; its URL."""
    out = config.parent
    log_path = out / "haproxy.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [haproxy_binary(), "-W", "-db", "-f", str(config), "-p", str(out / "haproxy.pid")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its group: the master and its workers
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_live(url, process, log_path)
        yield url
    finally:
        stop_group(process)


def wait_live(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"haproxy exited: {log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health/live", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the test's gateway is not live: {log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def own_gateway(
    tmp_path_factory: pytest.TempPathFactory, signing_key: tuple[Any, Any]
) -> Iterator[str]:
    """The URL of a gateway of this module's own: development CORS default, a low rate."""
    _, auth = signing_key
    base = base_settings()
    out = tmp_path_factory.mktemp("gateway")
    settings = base.with_(gateway_dir=str(out), gateway_port=gateway_port())
    assert settings.cors_origins == DEV_CORS_ORIGINS
    config = write_config(settings, auth, base.jwks_url, Limits(subject_per_second=THROTTLED_RATE))
    with running_gateway(config, settings.gateway_port) as url:
        yield url


async def test_a_subject_above_its_limit_is_throttled_to_it_not_locked_out(
    own_gateway, signing_key
):
    key, auth = signing_key
    token = issue_access_token(key, str(uuid.uuid4()), Role.ANALYST, auth)
    headers = {"Authorization": f"Bearer {token}"}
    connections = [Connection(own_gateway) for _ in range(CONNECTIONS)]
    started = time.monotonic()
    deadline = started + RUN_SECONDS

    async def hammer(connection: Connection) -> list[tuple[int, str | None]]:
        replies = []
        while time.monotonic() < deadline:
            reply = await connection.request("GET", "/api/patients?limit=1", headers)
            replies.append((reply.status, reply.headers.get("retry-after")))
        await connection.close()
        return replies

    batches = await asyncio.gather(*map(hammer, connections))
    seconds = time.monotonic() - started
    replies = [r for batch in batches for r in batch]
    statuses = Counter(status for status, _ in replies)
    assert set(statuses) == {200, 429}, statuses
    # Far above the limit the whole time, yet answered at about the limit every second:
    # a limit that counted its own 429s would answer one second's worth, then nothing.
    assert statuses[429] > statuses[200], statuses
    assert statuses[200] >= 0.7 * THROTTLED_RATE * seconds, (statuses, seconds)
    assert statuses[200] <= THROTTLED_RATE * (seconds + 1), (statuses, seconds)
    assert {after for status, after in replies if status == 429} == {"1"}


async def test_an_allowed_origin_is_echoed_and_its_preflight_answered(own_gateway):
    origin = "http://localhost:5173"
    async with httpx.AsyncClient(base_url=own_gateway, timeout=30) as client:
        preflight = await client.options(
            "/api/patients",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == origin
        assert "POST" in preflight.headers["access-control-allow-methods"]
        refused = await client.get("/api/patients", headers={"Origin": origin})
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == origin
        assert "retry-after" in refused.headers["access-control-expose-headers"].lower()
        assert "Origin" in refused.headers["vary"]


@pytest.mark.parametrize(
    "origin",
    ["https://evil.example", "null", "http://localhost:4004.evil.example", "http://localhost"],
)
async def test_a_foreign_origin_or_null_gets_no_cors_headers(own_gateway, origin):
    async with httpx.AsyncClient(base_url=own_gateway, timeout=30) as client:
        preflight = await client.options(
            "/api/patients",
            headers={"Origin": origin, "Access-Control-Request-Method": "DELETE"},
        )
        assert preflight.status_code != 204
        assert "access-control-allow-origin" not in preflight.headers
        assert "access-control-allow-methods" not in preflight.headers
        refused = await client.get("/api/patients", headers={"Origin": origin})
        assert refused.status_code == 401
        assert "access-control-allow-origin" not in refused.headers
        assert "access-control-expose-headers" not in refused.headers


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
    guarded = [
        op for ops in document["paths"].values() for op in ops.values() if "x-required-roles" in op
    ]
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
