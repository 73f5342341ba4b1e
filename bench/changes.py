"""CPU per patient change in the command process: in a thread per request, as `change`,
beside decided in the event loop, as `change_async`.

    uv run python -m bench.changes      (needs PostgreSQL only; not part of `make bench`)

CALLERS tasks in one event loop each change a patient of their own, one change after
another, CHANGES times a round, on a caching, sealing store over a scratch database (as
the command process's store is): every patient is cached, each change keeps its email,
so `change_async` never needs a thread. The figure is `time.process_time` of this
process around a round (every thread: the loop, the request threads, the group
commit's leader) per change, the median of ROUNDS alternating rounds; the database's
own CPU is not in it. Without `change_async` (an older tree) only the thread's figure
is measured.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import date
from uuid import UUID

from bench.common import drop_database, main_for, scratch_database
from commands.service import PatientService, Written
from commands.store import CACHE_SIZE, EventStore
from domain.patients import PatientDetails
from runtime.crypto import Keyring, parse_master_key
from runtime.settings import Settings
from runtime.threads import in_thread

CALLERS = 16
CHANGES = 30
"""Changes per caller per round."""
ROUNDS = 7

Change = Callable[[PatientService, UUID, PatientDetails], Awaitable[Written]]


async def _in_thread(service: PatientService, patient_id: UUID, details: PatientDetails) -> Written:
    return await in_thread(service.change, patient_id, details, None, None)


async def _in_loop(service: PatientService, patient_id: UUID, details: PatientDetails) -> Written:
    return await service.change_async(patient_id, details, None, None)


def _details(n: int, email: str) -> PatientDetails:
    return PatientDetails(f"Bench Patient {n}", email, "1 Bench Street", date(1980, 1, 1))


async def _round(
    service: PatientService, change: Change, patients: list[tuple[UUID, str]], start: int
) -> tuple[float, float]:
    """CPU milliseconds per change, and changes per second."""

    async def caller(patient_id: UUID, email: str) -> None:
        for n in range(start, start + CHANGES):
            await change(service, patient_id, _details(n, email))

    cpu, wall = time.process_time(), time.monotonic()
    await asyncio.gather(*(caller(p, e) for p, e in patients))
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    done = len(patients) * CHANGES
    return 1000 * cpu / done, done / wall


async def _measure(url: str, settings: Settings) -> dict[str, tuple[list[float], list[float]]]:
    keyring = Keyring(parse_master_key(settings.master_key), url)
    store = await asyncio.to_thread(
        lambda: EventStore(url, pool_size=8, cache_size=CACHE_SIZE, keyring=keyring)
    )
    try:
        service = PatientService(store, settings.claim_secret())
        modes: dict[str, Change] = {"thread (change)": _in_thread}
        if hasattr(service, "change_async"):
            modes["loop (change_async)"] = _in_loop
        patients: dict[str, list[tuple[UUID, str]]] = {}
        for mode in modes:  # each its own patients, so both build the same histories
            patients[mode] = []
            for i in range(CALLERS):
                email = f"bench-{os.urandom(6).hex()}-{i}@example.org"
                written = await in_thread(
                    service.register, _details(0, email), date(2024, 1, 1), None
                )
                patients[mode].append((written.patient_id, email))
        figures: dict[str, tuple[list[float], list[float]]] = {m: ([], []) for m in modes}
        for mode, change in modes.items():  # warm: connections, code paths
            await _round(service, change, patients[mode], 1)
        for r in range(ROUNDS):
            for mode, change in modes.items():
                cpu, rate = await _round(service, change, patients[mode], (r + 1) * CHANGES + 1)
                figures[mode][0].append(cpu)
                figures[mode][1].append(rate)
        return figures
    finally:
        await asyncio.to_thread(store.close)
        keyring.close()


async def run(settings: Settings) -> list[str]:
    url = await asyncio.to_thread(scratch_database, settings, "bench_changes")
    try:
        figures = await _measure(url, settings)
    finally:
        await asyncio.to_thread(drop_database, settings, url)
    lines = [
        f"CPU per change, {CALLERS} concurrent callers, {ROUNDS} rounds of"
        f" {CALLERS * CHANGES} changes each, medians (`uv run python -m bench.changes`):",
        "",
        "| change | CPU per change (ms) | changes/s | rounds (ms) |",
        "| --- | --- | --- | --- |",
    ]
    for mode, (cpu, rate) in figures.items():
        lines.append(
            f"| {mode} | {statistics.median(cpu):.3f} | {statistics.median(rate):,.0f} |"
            f" {', '.join(f'{c:.3f}' for c in cpu)} |"
        )
    return lines


def main() -> None:
    main_for(run)


if __name__ == "__main__":
    main()
