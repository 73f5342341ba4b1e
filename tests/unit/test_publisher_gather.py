"""The publish loop's pace: a busy source is read in larger batches, a trickle at once.

The source here is a list in memory and its batches carry no events (what a cycle sends
to Kafka is proven against the real broker in the relay's and billing's tests): what is
under test is when the loop reads again."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Any

import pytest

from runtime import publisher as loop
from runtime.publisher import GATHER_FROM, Batch, Publisher

GATHER_S = 0.2
"""The pause under test, longer than the loop's own so that scheduling noise cannot
blur a pause with none."""


@pytest.fixture(autouse=True)
def pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "GATHER_S", GATHER_S)


class Entries:
    """A source holding `pending` entries; records when each read came and what it took."""

    name = "test"

    def __init__(self, pending: int = 0):
        self.pending = pending
        self.reads: list[tuple[float, int]] = []
        self.arrived = asyncio.Event()

    async def open(self) -> None:
        pass

    async def read(self, limit: int) -> Batch:
        took = min(limit, self.pending)
        self.pending -= took
        self.reads.append((time.monotonic(), took))
        return Batch([], None, took)

    async def record(self, mark: Any) -> None:
        pass

    async def backlog(self) -> int:
        return self.pending

    async def wait(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.arrived.wait(), 0.5)
        self.arrived.clear()

    async def close(self) -> None:
        pass

    def add(self, count: int) -> None:
        self.pending += count
        self.arrived.set()


async def running(source: Entries, batch_size: int = 500) -> tuple[Publisher, asyncio.Task[None]]:
    publisher = Publisher(source, producer=None, batch_size=batch_size)  # type: ignore[arg-type]
    return publisher, asyncio.create_task(publisher.run())


async def test_a_busy_source_is_read_again_only_after_a_pause_and_in_larger_batches():
    source = Entries()
    publisher, task = await running(source)
    for _ in range(20):  # 40 entries every 50 ms
        source.add(40)
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    publisher.stop()
    await task
    busy = [(t, n) for t, n in source.reads if n >= GATHER_FROM]
    assert sum(n for _, n in source.reads) == 800
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(busy)]
    assert gaps and min(gaps) >= GATHER_S * 0.9, gaps
    assert max(n for _, n in busy) > 40  # several arrivals gathered into one read


async def test_a_trickle_is_read_at_once_and_a_full_batch_is_followed_at_once():
    source = Entries()
    publisher, task = await running(source, batch_size=50)
    await asyncio.sleep(0.05)
    waits = []
    for _ in range(5):
        source.reads.clear()
        added = time.monotonic()
        source.add(1)
        while not any(n for _, n in source.reads):
            await asyncio.sleep(0.001)
        waits.append(next(t for t, n in source.reads if n) - added)
    assert max(waits) < GATHER_S / 2, waits  # nothing gathered: one alone goes at once

    source.reads.clear()
    source.add(160)  # far behind: whole batches, read back to back
    await asyncio.sleep(0.5)
    publisher.stop()
    await task
    full = [t for t, n in source.reads if n == 50]
    assert len(full) == 3
    assert max(b - a for a, b in itertools.pairwise(full)) < GATHER_S / 2
