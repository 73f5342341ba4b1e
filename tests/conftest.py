"""Shared fixtures. Integration and e2e tests use the real PostgreSQL, Kafka and Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from commands.store import EventStore
from ops.settings import Settings
from tests.support.stack import isolated_settings


@pytest.fixture(scope="session")
def settings() -> Iterator[Settings]:
    """A database and topic prefix of this test session's own, on the real servers."""
    with isolated_settings() as isolated:
        yield isolated


@pytest.fixture(scope="session")
def store(settings: Settings) -> Iterator[EventStore]:
    event_store = EventStore(settings.database_url)
    yield event_store
    event_store.close()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()
