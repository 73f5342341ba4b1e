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

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from eventsourcing.persistence import Recording

from commands.store import EventStore
from runtime import tracing
from runtime.threads import in_thread


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
    answer: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None
    """Of a save awaited in an event loop (`save_async`): no thread of its own waits."""


class GroupCommit:
    """Saves aggregates through `store.save`, batching saves made at the same time."""

    def __init__(self, store: EventStore, max_batch: int = 64):
        self.store = store
        self.max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Save] = []
        self._leading = False
        self._leader = ThreadPoolExecutor(1, thread_name_prefix="group-commit")
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

    async def save_async(self, *objects: Any) -> list[Recording[Any]]:
        """`save` from an event loop, without a thread per save: the save waits in the
        queue as a future, and a batch led by such a save is committed by this writer's
        own leader thread (one hand-off per batch, not per save), which also remembers
        what it saved. Only one batch commits at a time, so one thread is enough."""
        if tracing.enabled():
            return await in_thread(self.save, *objects)
        loop = asyncio.get_running_loop()
        item = self._item(objects)
        item.answer = (loop, loop.create_future())
        if self._enqueue(item):
            self._leader.submit(self._lead)
        await item.answer[1]
        if item.error is not None:
            raise item.error
        assert item.recordings is not None
        return item.recordings

    @staticmethod
    def _item(objects: tuple[Any, ...]) -> _Save:
        present = [o for o in objects if o is not None]
        collected = [(o, o.collect_events()) for o in present]
        return _Save(
            [event for _, pending in collected for event in pending],
            frozenset(o.id for o in present),
            [(o, len(pending)) for o, pending in collected],
        )

    def _enqueue(self, item: _Save) -> bool:
        """Queues a save; True if it is to lead (no commit is under way)."""
        with self._lock:
            self._queue.append(item)
            if not self._leading:
                self._leading = True
                item.lead = True
        return item.lead

    def _save(self, objects: tuple[Any, ...]) -> list[Recording[Any]]:
        item = self._item(objects)
        if not self._enqueue(item):
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
        answers: dict[asyncio.AbstractEventLoop, list[_Save]] = {}
        for item in batch:
            if item.answer is None:
                item.ready.set()
                continue
            if item.error is None:
                # Its task is in a loop, where a snapshot's write would block: here.
                self.store.remember(item.saved)
            answers.setdefault(item.answer[0], []).append(item)
        for loop, items in answers.items():
            with contextlib.suppress(RuntimeError):  # a loop that has closed
                loop.call_soon_threadsafe(_answer, items)
        if successor is not None:
            if successor.answer is None:
                successor.ready.set()
            else:
                self._leader.submit(self._lead)

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


def _answer(items: list[_Save]) -> None:
    """In the loop: wakes the tasks of a committed batch's saves."""
    for item in items:
        assert item.answer is not None
        if not item.answer[1].done():  # its request was cancelled
            item.answer[1].set_result(None)
