"""Every HTTP API, fuzzed from its own OpenAPI document: no input makes it answer 5xx,
and every answer is one the document describes.

A bounded schemathesis run against each service (commands, read-api, auth) and against
the gateway in front of them (its /api-docs documents). Every operation gets the
schema's examples, its coverage cases (boundaries, wrong types, missing and extra
fields, bad query parameters) and a few random cases; each answer must be below 500,
each 4xx must be `application/problem+json`, the error format every service and the
gateway promise, and each answer must conform to the document: a documented status,
a documented media type, a body that fits the documented schema and documented
headers that fit theirs (`CONFORMANCE`). An answer the document does not describe fails
the run, so the document cannot drift from the wire.

A fuzz run must not change data it did not create: the services and the gateway here
are the attack suite's own processes on an isolated database and topic prefix (the
`edge` fixture), so whatever the fuzzer writes, disables or revokes is its own and is
dropped with that database; the shared stack never sees a fuzz request. Access tokens
belong to the run's own users: minted with the isolated auth service's key for the
command and query APIs, and for the auth service an admin it created and logged in.
The query API's read-your-writes 503 (a `minPosition` the read model has not reached, with
Retry-After) is the one 5xx answered by design; every other one fails the run.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import httpx
import pytest
import schemathesis
import schemathesis.engine
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import Status, events
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from domain.roles import Role
from tests.support.revocation import Stack
from tests.support.tokens import TestTokens

pytestmark = pytest.mark.e2e

MAX_EXAMPLES = int(os.environ.get("CARELOG_FUZZ_EXAMPLES", "15"))
"""Random cases per operation, beside the examples and coverage cases. 15 keeps the whole
fuzz suite within a few minutes on two cores; `make fuzz` runs it with many more."""
PASSWORD = "fuzz run's own password 1"
CONFORMANCE = (
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
)
"""schemathesis's checks that each answer is the one the document describes."""


@pytest.fixture(scope="module")
def minted(edge_tokens: TestTokens) -> str:
    return edge_tokens.token(Role.ADMIN)


@pytest.fixture(scope="module")
def logged_in(edge: Stack, minted: str) -> str:
    """The access token of an admin user the run created at its own auth service."""
    email = f"fuzz-{uuid.uuid4().hex[:12]}@example.org"
    with httpx.Client(base_url=edge.auth, timeout=30) as client:
        created = client.post(
            "/auth/users",
            json={"email": email, "password": PASSWORD, "role": Role.ADMIN.value},
            headers={"Authorization": f"Bearer {minted}"},
        )
        assert created.status_code == 201, created.text
        session = client.post("/auth/login", json={"email": email, "password": PASSWORD})
        assert session.status_code == 200, session.text
        return str(session.json()["token"])


def fuzz(document_url: str, base_url: str, token: str) -> None:
    """Runs schemathesis over every operation of the document and fails with each finding
    (the check that failed and a curl line that repeats the request)."""
    config = SchemathesisConfig.from_dict(
        {
            "base-url": base_url,
            "headers": {"Authorization": f"Bearer {token}"},
            "generation": {"max-examples": MAX_EXAMPLES, "database": "none"},
            "phases": {"stateful": {"enabled": False}},
            "checks": {
                "enabled": False,
                no_server_error.__name__: {"enabled": True},
                problem_details_on_4xx.__name__: {"enabled": True},
                **{check.__name__: {"enabled": True} for check in CONFORMANCE},
            },
            "request-timeout": 30,
        }
    )
    schema = schemathesis.openapi.from_url(document_url, config=config, timeout=30)
    operations = {result.ok().label for result in schema.get_all_operations()}
    answered: set[str] = set()
    found: list[str] = []
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            if any(i.response is not None for i in recorder.interactions.values()):
                answered.add(recorder.label)
            found.extend(
                f"{recorder.label}: {node.failure_info.failure.title}\n"
                f"{node.failure_info.code_sample}"
                for nodes in recorder.checks.values()
                for node in nodes
                if node.status == Status.FAILURE and node.failure_info is not None
            )
        elif isinstance(event, events.NonFatalError):
            found.append(f"{event.label}: {event.info.title}\n{event.info}")
        elif isinstance(event, events.FatalError):
            found.append(f"the run: {event.exception!r}")
    assert not found, f"{len(found)} findings:\n\n" + "\n\n".join(found)
    # A run that reached nothing would pass for nothing.
    assert operations and answered == operations, sorted(operations - answered)


def position_not_reached_yet(response: Any, case: Any) -> bool:
    """The query API's read-your-writes answer: the read model has not reached the client's
    `minPosition` within the bounded wait (here nothing projects, so no position ever is).
    A 503 with Retry-After by design: the client retries, as for any lagging projection."""
    return (
        response.status_code == 503
        and "minPosition" in (case.query or {})
        and "retry-after" in response.headers
        and "has not reached minPosition" in response.text
    )


@schemathesis.check
def no_server_error(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis's `not_a_server_error`, except for the designed read-your-writes 503."""
    if position_not_reached_yet(response, case):
        return None
    return not_a_server_error(ctx, response, case)


@schemathesis.check
def problem_details_on_4xx(ctx: Any, response: Any, case: Any) -> bool | None:
    """A client error is described as problem+json, whoever answers it."""
    if 400 <= response.status_code < 500:
        content_type = (response.headers.get("content-type") or [""])[0]
        assert content_type.startswith("application/problem+json"), (
            f"{response.status_code} answered as {content_type!r}: {response.text[:300]!r}"
        )
        assert "Traceback" not in response.text
    return None


def test_the_command_api_never_answers_5xx(edge: Stack, minted: str) -> None:
    fuzz(f"{edge.commands}/schema/openapi.json", edge.commands, minted)


def test_the_query_api_never_answers_5xx(edge: Stack, minted: str) -> None:
    fuzz(f"{edge.queries}/schema/openapi.json", edge.queries, minted)


def test_the_auth_service_never_answers_5xx(edge: Stack, logged_in: str) -> None:
    fuzz(f"{edge.auth}/schema/openapi.json", edge.auth, logged_in)


def test_the_gateway_never_answers_5xx_for_patients(edge: Stack, minted: str) -> None:
    assert edge.gateway is not None
    fuzz(f"{edge.gateway}/api-docs/patients", edge.gateway, minted)


def test_the_gateway_never_answers_5xx_for_auth(edge: Stack, logged_in: str) -> None:
    assert edge.gateway is not None
    fuzz(f"{edge.gateway}/api-docs/auth", edge.gateway, logged_in)
