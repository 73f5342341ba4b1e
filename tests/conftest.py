"""Shared fixtures. Integration and e2e tests use the real PostgreSQL, Kafka and Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from commands.store import EventStore
from runtime.cache import redis_for
from runtime.crypto import Keyring
from runtime.settings import Settings
from tests.support.stack import isolated_settings
from tests.support.tokens import TestTokens


@pytest.fixture(scope="session")
def settings() -> Iterator[Settings]:
    """A database and topic prefix of this test session's own, on the real servers."""
    with isolated_settings() as isolated:
        yield isolated


@pytest.fixture(scope="session")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> TestTokens:
    """Signs access tokens with a key of this session's own; pass `tokens.verifier` to apps."""
    return TestTokens(tmp_path_factory.mktemp("auth") / "keys")


@pytest.fixture(scope="session")
def keyring(settings: Settings) -> Iterator[Keyring]:
    """Seals and opens patients' personal fields, as the services do."""
    ring = Keyring.from_settings(settings)
    yield ring
    ring.close()


@pytest.fixture(scope="session")
def store(settings: Settings, keyring: Keyring) -> Iterator[EventStore]:
    event_store = EventStore(settings.database_url, keyring=keyring)
    yield event_store
    event_store.close()


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = redis_for(settings)
    yield client
    await client.aclose()


@pytest.fixture
def own_settings() -> Iterator[Settings]:
    """A database and topics of this test's own, for tests that count everything they see."""
    with isolated_settings() as isolated:
        yield isolated


@pytest.fixture
def own_store(own_settings: Settings) -> Iterator[EventStore]:
    ring = Keyring.from_settings(own_settings)
    event_store = EventStore(own_settings.database_url, keyring=ring)
    yield event_store
    event_store.close()
    ring.close()
