"""The relay process: the event store's log → Kafka, with health and metrics on its port."""

from __future__ import annotations

import asyncio
import signal
import time

import anyio

from commands.relay import EventStoreLog
from commands.store import EventStore
from runtime.http import serve_health, settle_heap
from runtime.kafka import ensure_topics, reliable_producer, wait_for_kafka
from runtime.publisher import Publisher
from runtime.settings import Settings


async def run(settings: Settings) -> None:
    """Runs the relay until SIGTERM or SIGINT."""
    store = await anyio.to_thread.run_sync(lambda: EventStore(settings.database_url, pool_size=2))
    await wait_for_kafka(settings)
    producer = reliable_producer(settings)
    await producer.start()
    source = EventStoreLog(store, settings.database_url, topic_prefix=settings.topic_prefix)
    await ensure_topics(settings, source.topics)
    publisher = Publisher(source, producer)

    async def database() -> None:
        await anyio.to_thread.run_sync(store.recorder.max_notification_id)

    async def kafka() -> None:
        await producer.client.fetch_all_metadata()

    async def following() -> None:
        if time.monotonic() - publisher.last_cycle > 10:
            raise TimeoutError("no relay cycle completed in the last 10 s")

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, publisher.stop)
    server = await serve_health(
        {"database": database, "kafka": kafka, "following": following},
        settings.http_host,
        settings.ports["relay"],
    )
    settle_heap()
    try:
        await publisher.run()
    finally:
        await server.stop()
        await producer.stop()
        store.close()
