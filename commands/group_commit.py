"""Group commit: concurrent saves share one event-store transaction.

The event store serialises its inserting transactions (so positions commit in
order, which the relay relies on), and each commit waits for the disk. Saving
the changes of many concurrent commands in one transaction pays for that once.

A thread that finds no commit under way leads: it takes every save queued so far
(its own first), commits them together, wakes their threads with their
recordings, and hands leadership to the next queued save, if any. When the
combined commit fails (two commands raced for one aggregate version, say), each
save of that batch is committed on its own, so only the loser sees its error.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from eventsourcing.persistence import Recording

from commands.store import EventStore
from runtime import tracing


@dataclass(eq=False)
class _Save:
    events: list[Any]
    """Collected once: a failed save has already drained the aggregates' pending events."""
    ids: frozenset[Any]
    saved: list[tuple[Any, int]]
    """Each aggregate with how many events it adds, for the store to remember once saved."""
    ready: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    recordings: list[Recording[Any]] | None = None
    error: BaseException | None = None


class GroupCommit:
    """Saves aggregates through `store.save`, batching saves made at the same time."""

    def __init__(self, store: EventStore, max_batch: int = 64):
        self.store = store
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Save] = []
        self._leading = False
        self.batches = 0
        self.saves = 0

    def save(self, *objects: Any) -> list[Recording[Any]]:
        """Like `store.save`: returns this save's recordings or raises its error."""
        if not tracing.enabled():
            return self._save(objects)
        with tracing.tracer().start_as_current_span("event_store.save", **tracing.QUIET) as span:
            try:
                recordings = self._save(objects)
            except BaseException as exc:
                tracing.mark_failed(span, exc)
                raise
            events = [r.domain_event for r in recordings]
            causes = sorted({c for e in events if (c := getattr(e, "correlation_id", None))})
            span.set_attributes(
                {
                    "carelog.event_types": [type(e).__qualname__ for e in events],
                    "carelog.aggregate_ids": sorted({str(e.originator_id) for e in events}),
                    "carelog.positions": [r.notification.id for r in recordings],
                }
            )
            if len(causes) == 1:
                span.set_attribute(tracing.CORRELATION_ID, causes[0])
            return recordings

    def _save(self, objects: tuple[Any, ...]) -> list[Recording[Any]]:
        present = [o for o in objects if o is not None]
        collected = [(o, o.collect_events()) for o in present]
        events = [event for _, pending in collected for event in pending]
        item = _Save(
            events,
            frozenset(o.id for o in present),
            [(o, len(pending)) for o, pending in collected],
        )
        with self._lock:
            self._queue.append(item)
            if not self._leading:
                self._leading = True
                item.lead = True
        if not item.lead:
            item.ready.wait()
        if item.lead:
            self._lead()
        if item.error is not None:
            raise item.error
        assert item.recordings is not None
        self.store.remember(item.saved)
        return item.recordings

    def _lead(self) -> None:
        with self._lock:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
        self._commit(batch)
        with self._lock:
            if self._queue:
                successor = self._queue[0]
                successor.lead = True
            else:
                self._leading = False
                successor = None
        for item in batch:
            item.ready.set()
        if successor is not None:
            successor.ready.set()

    def _commit(self, batch: list[_Save]) -> None:
        self.batches += 1
        self.saves += len(batch)
        if len(batch) > 1:
            try:
                recordings = self.store.save(*(e for item in batch for e in item.events))
            except Exception:  # noqa: S110 (each save is retried alone, and reports its own error)
                pass
            else:
                for item in batch:
                    item.recordings = [
                        r for r in recordings if r.domain_event.originator_id in item.ids
                    ]
                return
        for item in batch:
            try:
                item.recordings = self.store.save(*item.events)
            except Exception as exc:
                item.error = exc
