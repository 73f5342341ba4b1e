"""Register throughput with sealing (per-patient keys, AES-GCM) against without it, same run.

Both sides are the command side's own write path (PatientService over the event store, group
commit, the aggregate cache), driven by the same number of threads against the same
PostgreSQL, in alternating rounds so that both see the same machine. The only difference is
the store's keyring: with it, each registration also makes the patient's data key (one
INSERT) and seals six fields; without it, the fields are stored as they are.

The store is a scratch database beside the stack's (migrated, empty), so the relay and the
consumers do not work off one round's events during the next: each round measures its own
writes, not the backlog of the round before.

`uv run python -m bench.sealing` prints this section alone.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
import uuid
from datetime import date

from bench.common import drop_database, main_for, scratch_database
from commands.service import PatientService
from commands.store import CACHE_SIZE, EventStore
from domain.patients import PatientDetails
from runtime.crypto import Keyring, parse_master_key
from runtime.settings import Settings

ROUNDS = 5
ROUND_SECONDS = 5.0
THREADS = 32
AIM = 0.8


def _round(service: PatientService, seconds: float, threads: int) -> float:
    """Registrations per second by `threads` writers for `seconds`."""
    done = [0] * threads
    stop = time.monotonic() + seconds
    run = uuid.uuid4().hex[:8]

    def writer(n: int) -> None:
        i = 0
        while time.monotonic() < stop:
            details = PatientDetails(
                f"Bench Sealing {n} {i}",
                f"seal-{run}-{n}-{i}@example.org",
                f"{i} Bench Road",
                date(1980, 1, 1),
            )
            service.register(details, date(2024, 1, 2))
            i += 1
        done[n] = i

    started = time.monotonic()
    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(done) / (time.monotonic() - started)


def measure(settings: Settings) -> tuple[list[float], list[float]]:
    url = scratch_database(settings, "bench_sealing")
    try:
        return _measure(settings, url)
    finally:
        drop_database(settings, url)


def _measure(settings: Settings, url: str) -> tuple[list[float], list[float]]:
    keyring = Keyring(parse_master_key(settings.master_key), url)
    plain = EventStore(url, pool_size=8, cache_size=CACHE_SIZE)
    sealed = EventStore(url, pool_size=8, cache_size=CACHE_SIZE, keyring=keyring)
    try:
        key = settings.claim_secret()
        plain_service, sealed_service = PatientService(plain, key), PatientService(sealed, key)
        _round(plain_service, 1.0, THREADS)  # warm both: connections, caches
        _round(sealed_service, 1.0, THREADS)
        without, with_ = [], []
        for _ in range(ROUNDS):
            without.append(_round(plain_service, ROUND_SECONDS, THREADS))
            with_.append(_round(sealed_service, ROUND_SECONDS, THREADS))
        return without, with_
    finally:
        plain.close()
        sealed.close()
        keyring.close()


async def run(settings: Settings) -> list[str]:
    without, with_ = await asyncio.to_thread(measure, settings)
    plain, sealed = statistics.median(without), statistics.median(with_)
    ratio = sealed / plain if plain else 0.0
    return [
        "## Sealing: register throughput with per-patient encryption against without it",
        "",
        f"The command side's write path in one process ({THREADS} writer threads, group commit),"
        f" {ROUNDS} alternating rounds of {ROUND_SECONDS:.0f} s each, medians"
        " (`uv run python -m bench.sealing`). The store is a scratch database beside the"
        " stack's, so no relay or consumer works off one round's events during the next.",
        "",
        "| register | per second |",
        "| --- | --- |",
        f"| without sealing | {plain:,.0f} |",
        f"| with sealing (data key + AES-GCM) | {sealed:,.0f} |",
        "",
        f"With sealing: {ratio:.2f}x of without (aim: at least {AIM}x)."
        f" Rounds without: {', '.join(f'{r:,.0f}' for r in without)};"
        f" with: {', '.join(f'{r:,.0f}' for r in with_)}.",
    ]


def main() -> None:
    main_for(run)


if __name__ == "__main__":
    main()
