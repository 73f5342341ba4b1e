"""The directory projection's consumer: applies batches of `patient.events`, then the cache."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import structlog
from faststream.kafka import KafkaBroker
from prometheus_client import Counter, Gauge
from psycopg_pool import AsyncConnectionPool

from projections.directory import DirectoryProjection
from readmodels.directory import ERASED_ENTRY, DirectoryCache
from runtime.consumers import Batch, EventBatchWorker

log = structlog.get_logger(__name__)

EVENTS = Counter(
    "carelog_projection_events_total", "Events handled by a projection", ["projection", "outcome"]
)
POSITION = Gauge("carelog_projection_position", "Highest global position applied", ["projection"])
LAG = Gauge(
    "carelog_projection_lag_seconds",
    "Time from an event's occurrence to its application, for the latest batch",
    ["projection"],
)

GROUP = "carelog-directory"


class DirectoryWorker(EventBatchWorker):
    """Applies a batch to the directory, then refreshes the cache."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        cache: DirectoryCache,
        broker: KafkaBroker,
        dead_letter_topic: str,
        projection: DirectoryProjection | None = None,
    ):
        self.projection = projection or DirectoryProjection()
        super().__init__(self.projection.name, broker, dead_letter_topic)
        self.pool = pool
        self.cache = cache

    async def apply(self, batch: Batch) -> None:
        async with self.pool.connection() as conn:
            outcome = await self.projection.apply(conn, batch)
        await self.cache.changed(outcome.changed)
        if any(body == ERASED_ENTRY for _, _, body in outcome.changed):
            await self.cache.forget_pages()
        EVENTS.labels(self.name, "applied").inc(outcome.applied)
        EVENTS.labels(self.name, "duplicate").inc(outcome.duplicates)
        POSITION.labels(self.name).set(outcome.position)
        newest = max(envelope.occurred_at for envelope, _ in batch)
        LAG.labels(self.name).set(max(0.0, (datetime.now(UTC) - newest).total_seconds()))
