"""Benchmark of `carelog projections rebuild directory` on the running stack.

    uv run python -m bench.rebuild      (part of `make bench`; needs `make up`)

- Floor: a raw sequential read and decode of the same store's patient events
  (the notifications, mapped to events and envelopes), with nothing applied.
- Rebuild rate: events applied per second by a whole rebuild, unthrottled
  (`--duty 1`) and as operators run it (the default duty, 0.25: it pauses three times as
  long as it works), each swapped in and its old copy dropped afterwards.
- Reads: p99 of the first page of patients on the query API, without a rebuild and
  while a default rebuild runs, the same number of requests each.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import anyio

from bench.common import closed_loop, main_for, ms, token_headers
from bootstrap import rebuild
from commands.store import EventStore
from runtime.crypto import Keyring
from runtime.settings import Settings

READS = 2000


def _floor(store: EventStore) -> tuple[int, float]:
    log = rebuild.Log(store, rebuild.MODELS["directory"])
    events, after = 0, 0
    started = time.perf_counter()
    while True:
        batch, last = log.read(after, None)
        if last == after:
            break
        events += len(batch)
        after = last
    return events, time.perf_counter() - started


def _quiet(total: int, done: int) -> Any:
    return lambda n: None


async def _rebuild(
    settings: Settings, store: EventStore, duty: float, allow: bool = False
) -> rebuild.Report:
    report = await rebuild.rebuild(
        settings, store, "directory", progress=_quiet, duty=duty, allow_differences=allow
    )
    await rebuild.drop_old(settings, "directory")
    return report


async def run(settings: Settings) -> list[str]:
    reads = os.environ.get("CARELOG_READ_API_URL", f"http://127.0.0.1:{settings.ports['read-api']}")
    headers = await token_headers(os.environ.get("CARELOG_AUTH_URL", "http://127.0.0.1:4005"))
    # As `carelog projections rebuild` builds it: the keyring opens sealed fields.
    store = await anyio.to_thread.run_sync(
        lambda: EventStore(settings.database_url, 2, keyring=Keyring.from_settings(settings))
    )
    try:
        await rebuild.drop_old(settings, "directory", rebuilding=True)
        await rebuild.drop_old(settings, "directory")
        events, seconds = await anyio.to_thread.run_sync(_floor, store)
        floor = events / seconds
        # The first may differ from a live model projected by older code (so it may swap
        # with differences); the one during reads must find it equal.
        full = await _rebuild(settings, store, 1.0, allow=True)
        page = "/patients?limit=20&sort=-registeredDate"
        quiet = await closed_loop(reads, lambda c, _: c.request("GET", page, headers), READS)
        during = asyncio.create_task(_rebuild(settings, store, rebuild.DEFAULT_DUTY))
        busy = await closed_loop(reads, lambda c, _: c.request("GET", page, headers), READS)
        throttled = await during
    finally:
        await anyio.to_thread.run_sync(store.close)
        if store.keyring is not None:
            await anyio.to_thread.run_sync(store.keyring.close)
    full_rate = full.events / full.seconds
    copy_rate = full.events / full.copy_seconds
    throttled_rate = throttled.events / throttled.seconds
    return [
        "## Rebuilding a read model",
        "",
        "`uv run python -m bench.rebuild` (part of `make bench`): `carelog projections rebuild"
        f" directory` over the running stack's store ({events} patient events), swapped in and"
        " its old copy dropped each time. Same run for every floor.",
        "",
        "| figure | value | floor, same run | ratio |",
        "| --- | --- | --- | --- |",
        f"| rebuild, unthrottled (`--duty 1`) | {full_rate:,.0f} events/s ({full.events} events"
        f" in {full.seconds:.1f} s, compared and swapped) | raw sequential read and decode of"
        f" the same events: {floor:,.0f} events/s | {full_rate / floor:.0%} |",
        f"| of which reading and applying (without creating, comparing, swapping) |"
        f" {copy_rate:,.0f} events/s | (same floor) | {copy_rate / floor:.0%} |",
        f"| rebuild, default (`--duty {rebuild.DEFAULT_DUTY}`) | {throttled_rate:,.0f} events/s"
        " | (same floor) |"
        f" {throttled_rate / floor:.0%} |",
        f"| query API first page during a default rebuild, {READS} requests | p50"
        f" {ms(busy.p(0.5))}, p99 {ms(busy.p(0.99))}, {busy.failures} failed"
        f" | without a rebuild: p50 {ms(quiet.p(0.5))}, p99 {ms(quiet.p(0.99))} |"
        f" p99 {busy.p(0.99) / quiet.p(0.99):.2f}x |",
        "",
        "Aim (issue): the rebuild at least 30% of the floor's rate.",
        "",
    ]


if __name__ == "__main__":
    main_for(run)
