"""The query API against real PostgreSQL and Redis: paging, filters, cache, read-your-writes."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from datetime import date, timedelta
from typing import Any
from uuid import uuid4

import pytest
from litestar.testing import AsyncTestClient
from redis.asyncio import Redis

from commands.service import PatientService
from commands.store import EventStore
from domain.roles import Role
from projections.directory import DirectoryProjection
from read_api.app import create_app
from readmodels.directory import DirectoryCache
from runtime.db import open_pool
from runtime.settings import Settings
from tests.support.patients import details, published
from tests.support.stack import claim_key, free_port

pytestmark = pytest.mark.integration


class Directory:
    """Writes through the real event store and projects into the real read model."""

    def __init__(self, settings: Settings, store: EventStore, pool: Any, redis: Redis):
        self.service = PatientService(store, claim_key())
        self.store = store
        self.pool = pool
        self.cache = DirectoryCache(redis, prefix=settings.cache_prefix)
        self.projection = DirectoryProjection()
        self.projected = store.recorder.max_notification_id() or 0

    async def catch_up(self) -> None:
        batch = published(self.store, self.projected + 1)
        if batch:
            async with self.pool.connection() as conn:
                outcome = await self.projection.apply(conn, batch)
            await self.cache.changed(outcome.changed)
        self.projected = self.store.recorder.max_notification_id() or 0


@pytest.fixture
async def directory(settings, store, redis) -> AsyncIterator[Directory]:
    pool = await open_pool(settings.database_url)
    yield Directory(settings, store, pool, redis)
    await pool.close()


@pytest.fixture
async def client(settings, tokens) -> AsyncIterator[AsyncTestClient[Any]]:
    app = create_app(settings.with_(read_wait_seconds=0.5), verifier=tokens.verifier)
    async with AsyncTestClient(app=app) as test_client:
        test_client.headers.update(tokens.headers(Role.ANALYST))
        yield test_client


async def test_a_patient_is_read_back_and_a_removed_one_is_404(client, directory):
    written = directory.service.register(details("Mary Seacole"), date(2024, 3, 1))
    await directory.catch_up()
    response = await client.get(f"/patients/{written.patient_id}")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "Mary Seacole"
    assert body["registeredDate"] == "2024-03-01"
    assert response.headers["etag"] == '"1"'
    directory.service.remove(written.patient_id)
    await directory.catch_up()
    assert (await client.get(f"/patients/{written.patient_id}")).status_code == 404
    assert (await client.get(f"/patients/{uuid.uuid4()}")).status_code == 404
    assert (await client.get("/patients/not-an-id")).status_code == 404


async def test_the_cache_never_serves_a_patient_older_than_the_projection(client, directory):
    written = directory.service.register(details("Before"), date(2024, 3, 1))
    await directory.catch_up()
    assert (await client.get(f"/patients/{written.patient_id}")).json()["name"] == "Before"
    directory.service.change(written.patient_id, details("After"))
    await directory.catch_up()
    again = await client.get(f"/patients/{written.patient_id}")
    assert again.json()["name"] == "After"
    assert again.headers["etag"] == '"2"'
    # A reader filling the cache from a stale read cannot overwrite the newer entry.
    await directory.cache.put_patient(str(written.patient_id), 1, b'{"name":"stale"}')
    assert (await client.get(f"/patients/{written.patient_id}")).json()["name"] == "After"


async def test_pages_follow_the_cursor_through_every_patient_in_every_order(client, directory):
    tag = uuid.uuid4().hex[:8]
    rng = random.Random(7)
    expected = []
    for i in range(23):
        name = f"Zed {tag} {rng.choice('ABCDEFGH')}{i:02d}"
        dob = date(1950, 1, 1) + timedelta(days=rng.randrange(20000))
        registered = date(2020, 1, 1) + timedelta(days=rng.randrange(5))  # many ties
        written = directory.service.register(details(name, date_of_birth=dob), registered)
        expected.append((str(written.patient_id), name, dob.isoformat(), registered.isoformat()))
    await directory.catch_up()
    keys = {
        "name": lambda e: (e[1].lower(), e[0]),
        "registeredDate": lambda e: (e[3], e[0]),
        "dateOfBirth": lambda e: (e[2], e[0]),
    }
    for sort, key in keys.items():
        for descending in (False, True):
            want = [e[0] for e in sorted(expected, key=key, reverse=descending)]
            order = f"-{sort}" if descending else sort
            got: list[str] = []
            cursor = None
            pages = 0
            while True:
                params = {"name": tag, "limit": 5, "sort": order}
                if cursor:
                    params["cursor"] = cursor
                page = (await client.get("/patients", params=params)).json()
                got += [p["id"] for p in page["patients"]]
                pages += 1
                cursor = page["next"]
                if cursor is None:
                    break
            assert got == want, order
            assert pages == 5


async def test_filters_combine(client, directory):
    tag = uuid.uuid4().hex[:8]
    old = directory.service.register(
        details(f"Old {tag}", date_of_birth=date(1940, 5, 5)), date(2021, 1, 1)
    )
    young = directory.service.register(
        details(f"Young {tag}", date_of_birth=date(2001, 5, 5)), date(2023, 6, 1)
    )
    await directory.catch_up()

    async def ids(**params: Any) -> set[str]:
        response = await client.get("/patients", params={"name": tag, **params})
        assert response.status_code == 200, response.text
        return {p["id"] for p in response.json()["patients"]}

    assert await ids() == {str(old.patient_id), str(young.patient_id)}
    assert await ids(dateOfBirthTo="1950-01-01") == {str(old.patient_id)}
    assert await ids(dateOfBirthFrom="2000-01-01") == {str(young.patient_id)}
    assert await ids(registeredFrom="2022-01-01", registeredTo="2023-12-31") == {
        str(young.patient_id)
    }
    assert await ids(email=young.patient.email.upper()) == {str(young.patient_id)}
    assert await ids(name=tag.upper()) == {str(old.patient_id), str(young.patient_id)}
    assert await ids(name=f"%{tag}") == set()  # wildcards are literal


@pytest.mark.parametrize(
    ("params", "fields"),
    [
        ({"limit": 0}, {"limit"}),
        ({"limit": 201}, {"limit"}),
        ({"limit": "ten"}, {"limit"}),
        ({"sort": "age"}, {"sort"}),
        ({"cursor": "garbage"}, {"cursor"}),
        ({"dateOfBirthFrom": "yesterday"}, {"dateOfBirthFrom"}),
        ({"registeredFrom": "2024-02-01", "registeredTo": "2024-01-01"}, {"registeredTo"}),
        ({"colour": "blue"}, {"colour"}),
        ({"name": "a\x00b"}, {"name"}),
        ({"email": "\x00"}, {"email"}),
        ({"minPosition": "-3"}, {"minPosition"}),
        ({"limit": 0, "sort": "foo", "bogus": 1}, {"limit", "sort", "bogus"}),
        (
            {"limit": "x", "dateOfBirthTo": "soon", "minPosition": 0, "a": 1, "b": 2},
            {"limit", "dateOfBirthTo", "minPosition", "a", "b"},
        ),
        # Rules beyond a parameter's type are named alongside its type errors.
        (
            {"limit": "x", "cursor": "garbage", "registeredFrom": "2024-02-01"}
            | {"registeredTo": "2024-01-01"},
            {"limit", "cursor", "registeredTo"},
        ),
    ],
)
async def test_bad_parameters_are_400_naming_them(client, params, fields):
    response = await client.get("/patients", params=params)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert set(response.json()["errors"]) == fields


@pytest.mark.parametrize(
    ("path", "params", "fields"),
    [
        (
            "/analytics/registrations",
            {"from": "2024-02-01", "to": "2024-01-01", "interval": "hour"},
            {"to", "interval"},
        ),
        (
            "/audit",
            {"limit": 0, "cursor": "garbage"}
            | {"from": "2024-01-02T00:00:00Z", "to": "2024-01-01T00:00:00Z"},
            {"limit", "cursor", "to"},
        ),
        (f"/patients/{uuid4()}/history", {"limit": 0, "cursor": "abc"}, {"limit", "cursor"}),
        ("/notifications", {"limit": 0, "cursor": "garbage"}, {"limit", "cursor"}),
    ],
)
async def test_every_listing_names_type_and_rule_errors_in_one_answer(
    client, tokens, path, params, fields
):
    response = await client.get(path, params=params, headers=tokens.headers(Role.ADMIN))
    assert response.status_code == 400, response.text
    assert set(response.json()["errors"]) == fields


async def test_one_patient_names_every_bad_parameter_too(client):
    response = await client.get(f"/patients/{uuid4()}", params={"minPosition": 0, "limit": 5})
    assert response.status_code == 400, response.text
    assert set(response.json()["errors"]) == {"minPosition", "limit"}


async def test_min_position_waits_for_the_projection_then_answers(client, directory):
    written = directory.service.register(details("Waiting"), date(2024, 3, 1))
    path = f"/patients/{written.patient_id}"
    early = await client.get(path, params={"minPosition": written.position})
    assert early.status_code == 503
    assert early.headers["retry-after"] == "1"
    await directory.catch_up()
    ready = await client.get(path, params={"minPosition": written.position})
    assert ready.status_code == 200
    listed = await client.get(
        "/patients", params={"minPosition": written.position, "name": "Waiting"}
    )
    assert str(written.patient_id) in {p["id"] for p in listed.json()["patients"]}
    # A position the directory has not applied (here: not yet written at all) is not reached.
    beyond = await client.get(path, params={"minPosition": written.position + 10_000})
    assert beyond.status_code == 503


async def test_health_reports_its_dependencies(client):
    ready = await client.get("/health/ready")
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "cache": "ok"}}


async def test_without_redis_reads_come_from_the_database_and_the_cache_is_degraded(
    settings, tokens, directory
):
    written = directory.service.register(details("No Cache"), date(2024, 3, 1))
    await directory.catch_up()
    nowhere = settings.with_(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    app = create_app(nowhere, verifier=tokens.verifier)
    async with AsyncTestClient(app=app) as test_client:
        test_client.headers.update(tokens.headers(Role.ANALYST))
        for _ in range(10):  # past the breaker's threshold: then Redis is not even tried
            one = await test_client.get(f"/patients/{written.patient_id}")
            assert one.status_code == 200
            assert one.json()["name"] == "No Cache"
        page = await test_client.get("/patients", params={"name": "No Cache"})
        assert page.status_code == 200
        assert str(written.patient_id) in {p["id"] for p in page.json()["patients"]}
        ready = await test_client.get("/health/ready")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        assert ready.json()["checks"]["database"] == "ok"
        assert ready.json()["checks"]["cache"].startswith("degraded")


async def test_an_open_breaker_skips_the_cache_without_piling_up_its_refusals(settings):
    """The breaker refuses by raising one exception object again and again; each raise
    that reached it would keep its frames alive in that object's traceback."""
    from purgatory.domain.model import OPENED

    from read_api import cache as guarded

    nowhere = settings.with_(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    redis = guarded.redis_client(nowhere)
    cache = guarded.GuardedCache(DirectoryCache(redis), failures=2, reset_seconds=60)
    try:
        for _ in range(3):  # two failures open the breaker
            assert await cache.get_page("q") == (None, None)
        breaker = await cache._breakers.get_breaker(guarded._CIRCUIT)
        assert breaker.context.state == OPENED
        for skipped in range(200):
            if skipped >= 100:
                cache._skip_until = 0.0  # as if it were time to ask the breaker again
            assert await cache.get_page("q") == (None, None)
        assert breaker.context.state == OPENED
        frames, traceback = 0, breaker.context._state.__traceback__
        while traceback is not None:
            frames, traceback = frames + 1, traceback.tb_next
        assert frames < 10
    finally:
        await redis.aclose()
