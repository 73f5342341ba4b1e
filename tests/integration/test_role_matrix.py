"""The role-by-endpoint matrix, in full, at the command and query APIs themselves.

The gateway checks tokens first; these tests hold the services to the same rules
when a request reaches them directly (defence in depth).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient

from commands.api import create_app as commands_app
from commands.store import EventStore
from domain.roles import (
    ANALYTICS_READERS,
    APPOINTMENT_ATTENDERS,
    APPOINTMENT_BOOKERS,
    AUDIT_READERS,
    CLINICIAN_ADMINS,
    HISTORY_READERS,
    NOTIFICATION_READERS,
    PATIENT_ERASERS,
    PATIENT_READERS,
    PATIENT_WRITERS,
    SCHEDULE_READERS,
    Role,
)
from read_api.app import create_app as read_app
from runtime.security import role_matrix
from runtime.settings import Settings
from tests.support.patients import body
from tests.support.tokens import BAD_TOKEN_KINDS, TestTokens

pytestmark = pytest.mark.integration

UNGUARDED = {"/health/live", "/health/ready", "/metrics"}


ROUTES: list[tuple[str, str, str, frozenset[Role]]] = [
    ("reads", "GET", "/patients", PATIENT_READERS),
    ("reads", "GET", "/patients/{patient_id}", PATIENT_READERS),
    ("reads", "GET", "/patients/{patient_id}/history", HISTORY_READERS),
    ("writes", "POST", "/patients", PATIENT_WRITERS),
    ("writes", "PUT", "/patients/{patient_id}", PATIENT_WRITERS),
    ("writes", "DELETE", "/patients/{patient_id}", PATIENT_WRITERS),
    ("writes", "PUT", "/patients/{patient_id}/preferences", PATIENT_WRITERS),
    ("writes", "POST", "/patients/{patient_id}/erase", PATIENT_ERASERS),
    ("reads", "GET", "/appointments", SCHEDULE_READERS),
    ("reads", "GET", "/appointments/{appointment_id}", SCHEDULE_READERS),
    ("reads", "GET", "/clinicians", SCHEDULE_READERS),
    ("reads", "GET", "/clinicians/{clinician_id}", SCHEDULE_READERS),
    ("reads", "GET", "/clinicians/{clinician_id}/slots", SCHEDULE_READERS),
    ("writes", "POST", "/appointments", APPOINTMENT_BOOKERS),
    ("writes", "POST", "/appointments/{appointment_id}/reschedule", APPOINTMENT_BOOKERS),
    ("writes", "POST", "/appointments/{appointment_id}/cancel", APPOINTMENT_BOOKERS),
    ("writes", "POST", "/appointments/{appointment_id}/check-in", APPOINTMENT_ATTENDERS),
    ("writes", "POST", "/appointments/{appointment_id}/complete", APPOINTMENT_ATTENDERS),
    ("writes", "POST", "/appointments/{appointment_id}/no-show", APPOINTMENT_ATTENDERS),
    ("writes", "POST", "/clinicians", CLINICIAN_ADMINS),
    ("writes", "PUT", "/clinicians/{clinician_id}/working-hours", CLINICIAN_ADMINS),
    ("writes", "POST", "/clinicians/{clinician_id}/time-off", CLINICIAN_ADMINS),
    (
        "writes",
        "DELETE",
        "/clinicians/{clinician_id}/time-off/{time_off_id}",
        CLINICIAN_ADMINS,
    ),
    ("writes", "PUT", "/clinicians/{clinician_id}/user", CLINICIAN_ADMINS),
    ("reads", "GET", "/analytics/registrations", ANALYTICS_READERS),
    ("reads", "GET", "/analytics/patients/age-bands", ANALYTICS_READERS),
    ("reads", "GET", "/analytics/appointments", ANALYTICS_READERS),
    ("reads", "GET", "/analytics/billing", ANALYTICS_READERS),
    ("reads", "GET", "/notifications", NOTIFICATION_READERS),
    ("reads", "GET", "/audit", AUDIT_READERS),
]
"""(app, method, route template, roles admitted) for every guarded endpoint."""


def endpoints() -> list[tuple[str, str, str, frozenset[Role]]]:
    """(app, method, a concrete path, roles admitted) for every guarded endpoint."""
    return [
        (app, method, re.sub(r"\{[^}]*\}", str(uuid.uuid4()), template), roles)
        for app, method, template, roles in ROUTES
    ]


@pytest.fixture(scope="module")
async def clients(
    settings: Settings, store: EventStore, tokens: TestTokens
) -> AsyncIterator[dict[str, AsyncTestClient[Any]]]:
    writes = commands_app(settings, store, verifier=tokens.verifier)
    reads = read_app(settings, verifier=tokens.verifier)
    async with AsyncTestClient(app=writes) as w, AsyncTestClient(app=reads) as r:
        yield {"writes": w, "reads": r}


async def call(client: AsyncTestClient[Any], method: str, path: str, headers: dict[str, str]):
    json = body() if method in ("POST", "PUT") else None
    return await client.request(method, path, json=json, headers=headers)


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize(("app", "method", "path", "admitted"), endpoints())
async def test_each_role_at_each_endpoint(clients, tokens, role, app, method, path, admitted):
    response = await call(clients[app], method, path, tokens.headers(role))
    if role in admitted:
        assert response.status_code not in (401, 403), response.text
    else:
        assert response.status_code == 403, response.text


@pytest.mark.parametrize(("app", "method", "path", "admitted"), endpoints())
async def test_no_token_is_401_with_a_challenge(clients, app, method, path, admitted):
    response = await call(clients[app], method, path, {})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("kind", BAD_TOKEN_KINDS)
@pytest.mark.parametrize(("app", "method", "path", "admitted"), endpoints())
async def test_every_kind_of_bad_token_is_401(clients, tokens, kind, app, method, path, admitted):
    response = await call(
        clients[app], method, path, {"Authorization": f"Bearer {tokens.forged(kind)}"}
    )
    assert response.status_code == 401, kind


async def test_health_metrics_and_schema_stay_open(clients):
    for client in clients.values():
        for path in ("/health/live", "/health/ready", "/metrics", "/schema/openapi.json"):
            assert (await client.get(path)).status_code == 200, path


@pytest.mark.parametrize("which", ["writes", "reads"])
def test_every_route_but_health_and_metrics_names_its_roles(clients, which):
    app: Litestar = clients[which].app
    tested = {(method, template) for name, method, template, _ in ROUTES if name == which}
    for (method, path), roles in role_matrix(app).items():
        if path in UNGUARDED or path.startswith("/schema"):
            continue
        assert roles is not None, f"{method} {path} has no role guard"
        assert (method, path) in tested, f"{method} {path} is not in the tested matrix"
