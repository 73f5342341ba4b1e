"""Kafka helpers shared by the relay, the projections and the tests.

Every Kafka client is made from the settings through `client_options` (aiokafka's
producers, consumers and admin clients) or `broker_security` (FastStream's broker), which
say how it authenticates (SASL) and whether it speaks TLS: no client is made another way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    TopicAlreadyExistsError,
    for_code,
)
from faststream.kafka import KafkaBroker
from faststream.kafka.security import parse_security
from faststream.message import StreamMessage
from faststream.security import BaseSecurity, SASLPlaintext, SASLScram256, SASLScram512

from runtime.settings import Settings

log = structlog.get_logger(__name__)

# Partitions of each event topic: per-aggregate order holds inside a partition
# because the key is the aggregate id.
EVENT_PARTITIONS = 6

_SASL = {"SCRAM-SHA-512": SASLScram512, "SCRAM-SHA-256": SASLScram256, "PLAIN": SASLPlaintext}


def broker_security(settings: Settings) -> BaseSecurity | None:
    """How a client authenticates and encrypts, as the settings say (None: plaintext)."""
    protocol = settings.kafka_security_protocol
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=settings.kafka_ca_file or None)
    if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
        sasl = _SASL[settings.kafka_sasl_mechanism]
        return sasl(settings.kafka_username, settings.kafka_password, ssl_context=context)
    return None if context is None else BaseSecurity(ssl_context=context)


def client_options(settings: Settings) -> dict[str, Any]:
    """The address and security options every aiokafka client is made with."""
    return {
        "bootstrap_servers": settings.kafka_bootstrap,
        **parse_security(broker_security(settings)),
    }


async def ensure_topics(
    settings: Settings, names: Iterable[str], partitions: int = EVENT_PARTITIONS
) -> None:
    """Creates the topics that do not exist yet; existing ones are left as they are."""
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=10_000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(
                name=name,
                num_partitions=partitions,
                replication_factor=settings.kafka_replication_factor,
            )
            for name in names
            if name not in existing
        ]
        if wanted:
            with contextlib.suppress(TopicAlreadyExistsError):
                response = await admin.create_topics(wanted)
                # The broker answers per topic; a refusal (too many replicas for the
                # cluster, say) is an error code in the answer, not an exception.
                for topic, code, *_ in response.topic_errors:
                    error = for_code(code)
                    if code and error is not TopicAlreadyExistsError:
                        raise error(f"creating topic {topic}")
    finally:
        await admin.close()


async def delete_topics(settings: Settings, prefix: str) -> list[str]:
    """Deletes every topic whose name starts with `prefix` (benchmarks' and tests' own)."""
    if not prefix:
        raise ValueError("an empty prefix would delete every topic")
    admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=10_000)
    await admin.start()
    try:
        doomed = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if doomed:
            await admin.delete_topics(doomed)
        return doomed
    finally:
        await admin.close()


async def wait_for_kafka(settings: Settings, timeout: float = 120.0) -> None:
    """Returns once the broker answers; raises KafkaConnectionError after `timeout`."""
    bootstrap = settings.kafka_bootstrap
    deadline = time.monotonic() + timeout
    pause = 0.5
    while True:
        admin = AIOKafkaAdminClient(**client_options(settings), request_timeout_ms=5_000)
        try:
            await admin.start()
            await admin.list_topics()
            return
        except KafkaError as exc:
            if time.monotonic() + pause > deadline:
                raise KafkaConnectionError(
                    f"Kafka at {bootstrap} did not answer in {timeout:.0f} s"
                ) from exc
            log.warning("waiting for Kafka", bootstrap=bootstrap, error=type(exc).__name__)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)
        finally:
            await admin.close()


def reliable_producer(settings: Settings) -> AIOKafkaProducer:
    """A producer that neither loses nor reorders what it was given (idempotent, acks=all)."""
    return AIOKafkaProducer(
        **client_options(settings),
        enable_idempotence=True,
        acks="all",
        linger_ms=2,
        max_batch_size=256 * 1024,
        request_timeout_ms=15_000,
    )


@dataclass(frozen=True)
class Records:
    """A batch as a consumer's handler takes it: each record's bytes (the envelope is
    decoded by its own contract) and each record's Kafka headers."""

    bodies: list[bytes]
    headers: list[dict[str, Any]]


async def raw_records(message: StreamMessage[Any]) -> Records:
    """The batch's records, whole, for a handler with one parameter of type Any: its
    headers come with it, so the handler asks for no `KafkaMessage` from the context
    (which FastStream resolves in a worker thread, a hand-off per batch) and nothing is
    validated record by record."""
    bodies: list[bytes] = list(message.body)  # type: ignore[arg-type]  # one per record
    return Records(bodies, message.batch_headers)


def kafka_broker(settings: Settings, client_id: str) -> KafkaBroker:
    """A broker whose per-message logs are debug level and whose errors are logged."""
    return KafkaBroker(
        settings.kafka_bootstrap,
        security=broker_security(settings),
        client_id=client_id,
        logger=logging.getLogger("carelog.kafka"),
        log_level=logging.DEBUG,
    )


async def partitions_of(settings: Settings, topics: Iterable[str]) -> dict[str, list[int]]:
    """Topic → its partition numbers, for the topics that exist."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [t for t in topics if t in existing]
        if not wanted:
            return {}
        described = await admin.describe_topics(wanted)
    finally:
        await admin.close()
    return {d["topic"]: sorted(p["partition"] for p in d["partitions"]) for d in described}


async def end_offsets(settings: Settings, topic: str) -> dict[int, int]:
    """Partition → the offset after its last message (nothing for a missing topic)."""
    partitions = (await partitions_of(settings, [topic])).get(topic, [])
    if not partitions:
        return {}
    consumer = AIOKafkaConsumer(**client_options(settings), enable_auto_commit=False)
    await consumer.start()
    try:
        offsets = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return {tp.partition: int(offset) for tp, offset in offsets.items()}
    finally:
        await consumer.stop()
