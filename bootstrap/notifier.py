"""The notifier process (`carelog notify`, health on 4015): the intake consumer on the
patient and appointment streams, the sender, and the reminder planner."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from datetime import timedelta

import structlog

from domain import contracts
from notifications.config import NotifierConfig
from notifications.intake import GROUP, IntakeWorker
from notifications.sender import Sender, plan_reminders
from runtime.consumers import subscribe
from runtime.crypto import Keyring
from runtime.db import open_pool
from runtime.http import broker_check, database_check, serve_health, settle_heap
from runtime.kafka import ensure_topics, kafka_broker, wait_for_kafka
from runtime.settings import Settings

log = structlog.get_logger(__name__)

REMINDER_EVERY_SECONDS = 15.0


async def run(settings: Settings, config: NotifierConfig) -> None:
    topics = [
        settings.topic(contracts.PATIENT_STREAM),
        settings.topic(contracts.APPOINTMENT_STREAM),
    ]
    group = f"{settings.topic_prefix}{GROUP}"
    dlq = f"{settings.topic('notifications')}.dlq.{GROUP}"
    await wait_for_kafka(settings)
    await ensure_topics(settings, topics)
    await ensure_topics(settings, [dlq], partitions=1)
    pool = await open_pool(settings.database_url, min_size=1, max_size=4)
    broker = kafka_broker(settings, group)
    intake = IntakeWorker(pool, broker, dlq, timedelta(hours=config.max_age_hours))
    keyring = Keyring.from_settings(settings)
    keyring.listen()
    subscribe(broker, topics, intake, group, keyring)
    sender = Sender(pool, config, settings.practice_timezone)
    stopping = asyncio.Event()

    async def reminders() -> None:
        while not stopping.is_set():
            try:
                await plan_reminders(pool, config.reminder_hours)
            except Exception as exc:
                log.warning("reminders not planned", error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), REMINDER_EVERY_SECONDS)

    database, kafka = database_check(pool), broker_check(broker)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await sender.lead(settings.database_url)
    await broker.start()
    tasks = [asyncio.create_task(sender.run(stopping)), asyncio.create_task(reminders())]
    server = await serve_health(
        {"database": database, "kafka": kafka}, settings.http_host, settings.ports["notifier"]
    )
    settle_heap()
    log.info("notifier started", topics=topics, group=group, smtp_port=config.smtp_port)
    await stopping.wait()
    await server.stop()
    await broker.stop()
    await asyncio.gather(*tasks)
    await sender.close()
    await pool.close()
    keyring.close()
