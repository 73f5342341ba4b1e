"""The command API against the real PostgreSQL event store."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from commands.api import create_app
from commands.store import CACHE_SIZE, EventStore
from domain.roles import Role
from runtime.crypto import Keyring
from runtime.settings import Settings
from tests.support.tokens import TestTokens

pytestmark = pytest.mark.integration


def patient(**overrides: Any) -> dict[str, Any]:
    body = {
        "name": "Ada Lovelace",
        "email": f"ada-{uuid.uuid4().hex[:12]}@example.org",
        "address": "12 St James's Square",
        "dateOfBirth": "1990-12-10",
        "registeredDate": "2024-01-02",
    }
    return body | overrides


@pytest.fixture(params=["uncached", "cached"])
async def client(
    request: pytest.FixtureRequest,
    settings: Settings,
    store: EventStore,
    keyring: Keyring,
    tokens: TestTokens,
) -> AsyncIterator[AsyncTestClient[Any]]:
    """The command API over the store as it is, and over one that caches what it saves, as
    the command process's does (a change of a patient it saved is decided in the loop)."""
    caching = None
    if request.param == "cached":
        caching = EventStore(settings.database_url, cache_size=CACHE_SIZE, keyring=keyring)
    try:
        app = create_app(settings, caching or store, verifier=tokens.verifier)
        async with AsyncTestClient(app=app) as test_client:
            test_client.headers.update(tokens.headers(Role.CLINICIAN))
            yield test_client
    finally:
        if caching is not None:
            caching.close()


async def test_register_answers_201_with_location_etag_and_position(client, store):
    response = await client.post("/patients", json=patient())
    assert response.status_code == 201, response.text
    body = response.json()
    assert response.headers["location"] == f"/patients/{body['id']}"
    assert response.headers["etag"] == '"1"'
    position = int(response.headers["event-position"])
    assert body["position"] == position
    assert body["version"] == 1
    stored = store.recorder.select_notifications(position, 1)[0]
    assert str(stored.originator_id) == body["id"]
    assert stored.topic.endswith("Patient.Registered")


async def test_every_answer_echoes_the_correlation_id_errors_included(client):
    given = {"X-Correlation-ID": "corr-echo-1"}
    invalid = await client.post("/patients", json={"name": ""}, headers=given)
    assert invalid.status_code == 400
    assert invalid.headers["x-correlation-id"] == "corr-echo-1"
    unknown_route = await client.get("/no-such-route", headers=given)
    assert unknown_route.status_code in (404, 405)
    assert unknown_route.headers["x-correlation-id"] == "corr-echo-1"
    denied = await client.post("/patients", json={}, headers={**given, "Authorization": "x"})
    assert denied.status_code == 401
    assert denied.headers["x-correlation-id"] == "corr-echo-1"


async def test_a_missing_or_unusable_correlation_id_is_replaced_by_a_new_one(client):
    first = await client.get("/health/live")
    second = await client.get("/health/live", headers={"X-Correlation-ID": "bad id with spaces"})
    ids = {first.headers["x-correlation-id"], second.headers["x-correlation-id"]}
    assert len(ids) == 2
    assert all(uuid.UUID(i) for i in ids)


async def test_the_correlation_id_is_kept_with_the_event(client, store):
    response = await client.post(
        "/patients", json=patient(), headers={"X-Correlation-ID": "corr-123"}
    )
    assert response.headers["x-correlation-id"] == "corr-123"
    stored = store.recorder.select_notifications(int(response.headers["event-position"]), 1)[0]
    assert store.mapper.to_domain_event(stored).correlation_id == "corr-123"


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        (b"{not json", {"body"}),
        (b"[]", {"body"}),
        (b"", {"body"}),
        (patient(name="", email="nope", extra=1), {"name", "email", "extra"}),
        (patient(dateOfBirth="2999-01-01", registeredDate=None), {"dateOfBirth", "registeredDate"}),
        (patient(name=7, address=["x"]), {"name", "address"}),
    ],
)
async def test_bad_input_is_a_400_naming_each_field_and_writes_nothing(client, store, body, fields):
    before = store.recorder.max_notification_id()
    if isinstance(body, bytes):
        response = await client.post("/patients", content=body)
    else:
        response = await client.post("/patients", json=body)
    assert response.status_code == 400, response.text
    assert set(response.json()["errors"]) == fields
    assert store.recorder.max_notification_id() == before


async def test_an_oversized_body_is_413(client):
    response = await client.post("/patients", json=patient(address="x" * 70_000))
    assert response.status_code == 413


async def test_a_taken_email_is_409_in_any_case(client):
    email = f"Grace-{uuid.uuid4().hex[:8]}@Example.org"
    assert (await client.post("/patients", json=patient(email=email))).status_code == 201
    again = await client.post("/patients", json=patient(email=email.lower()))
    assert again.status_code == 409
    assert again.json()["errors"] == {"email": "is already in use"}


async def test_twenty_racing_registrations_of_one_email_give_exactly_one_201(client):
    email = f"race-{uuid.uuid4().hex[:8]}@example.org"
    responses = await asyncio.gather(
        *(client.post("/patients", json=patient(email=email)) for _ in range(20))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] + [409] * 19, [r.text for r in responses if r.status_code != 409]


async def test_change_with_if_match(client):
    created = (await client.post("/patients", json=patient())).json()
    path = f"/patients/{created['id']}"
    change = patient(name="Ada King", email=created["email"])
    changed = await client.put(path, json=change, headers={"If-Match": '"1"'})
    assert changed.status_code == 200, changed.text
    assert changed.json()["name"] == "Ada King"
    assert changed.headers["etag"] == '"2"'
    assert int(changed.headers["event-position"]) > created["position"]
    lost = patient(name="Lost Update", email=created["email"])
    stale = await client.put(path, json=lost, headers={"If-Match": '"1"'})
    assert stale.status_code == 412
    assert stale.headers["etag"] == '"2"'
    bad = await client.put(path, json=change, headers={"If-Match": "version one"})
    assert bad.status_code == 400


async def test_changing_the_email_frees_the_old_one(client):
    created = (await client.post("/patients", json=patient())).json()
    new_email = f"new-{uuid.uuid4().hex[:8]}@example.org"
    changed = await client.put(f"/patients/{created['id']}", json=patient(email=new_email))
    assert changed.status_code == 200
    reuse = await client.post("/patients", json=patient(email=created["email"]))
    assert reuse.status_code == 201
    taken = await client.post("/patients", json=patient(email=new_email))
    assert taken.status_code == 409


async def test_remove_then_everything_is_404_and_the_email_is_free(client):
    created = (await client.post("/patients", json=patient())).json()
    path = f"/patients/{created['id']}"
    removed = await client.delete(path)
    assert removed.status_code == 204
    assert removed.headers["etag"] == '"2"'
    assert (await client.delete(path)).status_code == 404
    assert (await client.put(path, json=patient())).status_code == 404
    assert (await client.post("/patients", json=patient(email=created["email"]))).status_code == 201


@pytest.mark.parametrize("ident", [str(uuid.uuid4()), "not-a-uuid"])
async def test_unknown_ids_are_404(client, ident):
    assert (await client.put(f"/patients/{ident}", json=patient())).status_code == 404
    assert (await client.delete(f"/patients/{ident}")).status_code == 404


async def test_openapi_documents_the_body(client):
    schema = (await client.get("/schema/openapi.json")).json()
    body = schema["paths"]["/patients"]["post"]["requestBody"]["content"]["application/json"]
    name = body["schema"]["$ref"].rsplit("/", 1)[-1]
    assert set(schema["components"]["schemas"][name]["properties"]) == {
        "name",
        "email",
        "address",
        "dateOfBirth",
        "registeredDate",
    }


async def test_health_and_metrics(client):
    ready = await client.get("/health/ready")
    assert ready.json() == {"status": "ready", "checks": {"database": "ok"}}
    await client.post("/patients", json=patient())
    metrics = (await client.get("/metrics")).text
    assert 'carelog_commands_total{command="RegisterPatient",outcome="ok"}' in metrics
    assert 'path="/patients"' in metrics


async def test_preferences_opt_out_of_reminders_and_name_every_bad_field(client):
    created = (await client.post("/patients", json=patient())).json()
    path = f"/patients/{created['id']}/preferences"
    answer = await client.put(path, json={"reminders": False})
    assert answer.status_code == 200, answer.text
    assert (answer.json()["reminders"], answer.json()["version"]) == (False, 2)
    assert answer.headers["etag"] == '"2"'
    same = await client.put(path, json={"reminders": False})
    assert same.json()["version"] == 2  # setting what is set records nothing
    bad = await client.put(path, json={"reminders": "no", "colour": "blue"})
    assert bad.status_code == 400
    assert set(bad.json()["errors"]) == {"reminders", "colour"}
