"""The stack's Redis and Kafka admit only clients with its credentials.

`make up` generates them (.stack/secrets) and hands them to every process through the
settings; a client made from settings without them is refused, by Redis at once (NOAUTH)
and by Kafka's SASL listener before it answers a single request.
"""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from redis.exceptions import AuthenticationError, ResponseError

from runtime.cache import redis_for
from runtime.kafka import client_options, ensure_topics
from runtime.settings import Settings

pytestmark = pytest.mark.integration

# A refused Kafka client gives up within this (its own request timeout is shorter).
REFUSED_WITHIN = 20.0


def _redis_url(url: str, password: str | None) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f":{password}@{host}" if password else host))


async def test_redis_refuses_a_client_without_the_password(settings: Settings):
    assert urlsplit(settings.redis_url).password, "the stack's Redis URL carries a password"
    anonymous = redis_for(settings.with_(redis_url=_redis_url(settings.redis_url, None)))
    try:
        with pytest.raises(AuthenticationError, match=r"(?i)authenticat"):
            await anonymous.get(f"carelog:{uuid.uuid4()}")
    finally:
        await anonymous.aclose()


async def test_redis_refuses_a_wrong_password(settings: Settings):
    wrong = redis_for(settings.with_(redis_url=_redis_url(settings.redis_url, "not-it")))
    try:
        with pytest.raises((AuthenticationError, ResponseError)):
            await wrong.ping()
    finally:
        await wrong.aclose()


async def test_redis_serves_a_client_made_from_the_settings(settings: Settings):
    client = redis_for(settings)
    key = f"{settings.cache_prefix}auth-check:{uuid.uuid4()}"
    try:
        await client.set(key, b"1", ex=30)
        assert await client.get(key) == b"1"
    finally:
        await client.delete(key)
        await client.aclose()


async def _list_topics(settings: Settings) -> list[str]:
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=5_000)
    try:
        await admin.start()
        return list(await admin.list_topics())
    finally:
        await admin.close()


async def _produce(settings: Settings, topic: str) -> None:
    producer = AIOKafkaProducer(**client_options(settings), request_timeout_ms=5_000)
    try:
        await producer.start()
        await producer.send_and_wait(topic, b"must not arrive")
    finally:
        await producer.stop()


def _without_sasl(settings: Settings) -> Settings:
    return settings.with_(kafka_security_protocol="PLAINTEXT", kafka_username="", kafka_password="")


async def test_kafka_refuses_a_client_without_sasl_credentials(settings: Settings):
    assert settings.kafka_security_protocol.startswith("SASL_"), "the stack's Kafka uses SASL"
    topic = settings.topic(f"auth-check-{uuid.uuid4().hex[:8]}")
    await ensure_topics(settings, [topic], partitions=1)
    with pytest.raises(KafkaError):
        await asyncio.wait_for(_list_topics(_without_sasl(settings)), REFUSED_WITHIN)
    with pytest.raises(KafkaError):
        await asyncio.wait_for(_produce(_without_sasl(settings), topic), REFUSED_WITHIN)


async def test_kafka_refuses_a_wrong_password(settings: Settings):
    wrong = settings.with_(kafka_password="not-it")
    with pytest.raises(KafkaError):
        await asyncio.wait_for(_list_topics(wrong), REFUSED_WITHIN)


async def test_kafka_serves_a_client_made_from_the_settings(settings: Settings):
    topic = settings.topic(f"auth-check-{uuid.uuid4().hex[:8]}")
    await ensure_topics(settings, [topic], partitions=1)
    assert topic in await _list_topics(settings)
    await _produce(settings, topic)


async def test_topics_are_created_with_the_replication_factor_of_the_settings(settings: Settings):
    """The local broker is alone: asking it for two replicas must fail, which shows the
    setting reaches the broker (a cluster in production is asked for three)."""
    topic = settings.topic(f"replicas.{uuid.uuid4().hex[:8]}")
    with pytest.raises(KafkaError):
        await ensure_topics(settings.with_(kafka_replication_factor=2), [topic])
    await ensure_topics(settings, [topic])
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        assert topic in await admin.list_topics()
        await admin.delete_topics([topic])
    finally:
        await admin.close()
