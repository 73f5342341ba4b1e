"""One registration traced from the HTTP request to a consumer's batch.

The command API, the relay's publisher and a consumer run in this process against
the real PostgreSQL and Kafka (a database and topics of this test's own), recording
spans in memory: every span names the request's correlation id, and the consumer's
span continues, through the Kafka headers, the publish span of the message it read.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from commands.api import create_app
from commands.relay import EventStoreLog
from commands.store import EventStore
from domain.contracts import PATIENT_STREAM
from domain.roles import Role
from runtime import tracing
from runtime.consumers import Batch, EventBatchWorker
from runtime.kafka import ensure_topics, kafka_broker, reliable_producer
from runtime.publisher import Publisher
from runtime.settings import Settings
from tests.support.patients import body
from tests.support.stack import read_topic
from tests.support.tokens import TestTokens

pytestmark = pytest.mark.integration


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        yield exporter
    finally:
        tracing.use_provider(None)
        provider.shutdown()


class Applied(EventBatchWorker):
    """A consumer that keeps what it applied."""

    def __init__(self, settings: Settings):
        super().__init__("traced", kafka_broker(settings, "traced"), settings.topic("traced.dlq"))
        self.applied: Batch = []

    async def apply(self, batch: Batch) -> None:
        self.applied.extend(batch)


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_a_registration_is_one_story_from_request_to_consumer(
    own_settings: Settings, own_store: EventStore, tokens: TestTokens, spans: InMemorySpanExporter
):
    settings = own_settings
    correlation = f"trace-{uuid.uuid4()}"
    app = create_app(settings, own_store, verifier=tokens.verifier)
    async with AsyncTestClient(app=app) as client:
        created = await client.post(
            "/patients",
            json=body(),
            headers={**tokens.headers(Role.CLINICIAN), "X-Correlation-ID": correlation},
        )
    assert created.status_code == 201, created.text
    patient_id = created.json()["id"]

    source = EventStoreLog(own_store, settings.database_url, topic_prefix=settings.topic_prefix)
    await ensure_topics(settings, source.topics)
    producer = reliable_producer(settings)
    await producer.start()
    try:
        await source.open()
        try:
            assert await Publisher(source, producer).cycle() > 0
        finally:
            await source.close()
    finally:
        await producer.stop()

    (record,) = await read_topic(settings, settings.topic(PATIENT_STREAM), 1)
    worker = Applied(settings)
    worker.keyring = own_store.keyring  # opens the sealed fields, as `subscribe` arranges
    await worker.handle([record.value], [{k: v.decode() for k, v in record.headers}])
    assert [str(e.aggregate_id) for e, _ in worker.applied] == [patient_id]

    finished = spans.get_finished_spans()
    (request,) = named(finished, "POST /patients")
    (save,) = named(finished, "event_store.save")
    (batch,) = named(finished, "publish")
    (message,) = named(finished, f"publish {settings.topic(PATIENT_STREAM)}")
    (consumed,) = named(finished, "consume traced")

    # Inside the command API: the save is a child of the request.
    assert request.kind is SpanKind.SERVER
    assert save.context is not None and request.context is not None
    assert save.parent is not None and save.parent.span_id == request.context.span_id
    assert save.attributes is not None
    assert patient_id in save.attributes["carelog.aggregate_ids"]  # type: ignore[operator]

    # Across the store, the correlation id joins them.
    for span in (request, save, message):
        assert span.attributes is not None
        assert span.attributes[tracing.CORRELATION_ID] == correlation, span.name
    for span in (batch, consumed):
        assert span.attributes is not None
        assert correlation in span.attributes["carelog.correlation_ids"], span.name  # type: ignore[operator]
    assert message.attributes is not None
    assert message.attributes["carelog.aggregate_id"] == patient_id

    # Across Kafka: the consumer continues the message's publish span.
    assert message.parent is not None and batch.context is not None
    assert message.parent.span_id == batch.context.span_id
    assert message.context is not None and consumed.parent is not None
    assert consumed.context is not None
    assert consumed.context.trace_id == message.context.trace_id
    assert consumed.parent.span_id == message.context.span_id
    assert consumed.kind is SpanKind.CONSUMER

    # Nothing personal in any span.
    written: dict[str, Any] = body()
    for span in finished:
        values = " ".join(str(v) for v in (span.attributes or {}).values())
        for field in ("name", "address"):
            assert written[field] not in values, span.name
        assert "@" not in values, span.name  # no email
