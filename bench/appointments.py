"""Benchmark of appointments: booking throughput, booking under contention, slot search.

    uv run python -m bench.appointments      (part of `make bench`; needs `make up`)

- Booking: 16 clients book random 30-minute slots across 20 clinicians (always
  working, UTC) over the next 60 days, each for one of 400 patients, against the
  command API. Overlaps are rare; those that happen answer 409. The floor is the
  same run's single-row PostgreSQL INSERT rate.
- Contention: 16 clients fight over the same 10 slots of one clinician, each
  request for a new patient. Exactly 10 may win. Every 201 is then looked up in
  the read model (nothing lost), and no answer may be a 5xx.
- Slot search: GET /clinicians/{id}/slots for a busy day on the query API, against
  the bare endpoint (GET /health/live) of the same server.
"""

from __future__ import annotations

import os
import random
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.common import CONCURRENCY, closed_loop, insert_floor, main_for, ms, token_headers
from bench.loadgen import Connection
from runtime.settings import Settings

CLINICIANS = 20
PATIENTS = 400
BOOKINGS = 1500
CONTENDED_SLOTS = 10
CONTENDED_REQUESTS = 400
SEARCHES = 3000
ALWAYS = {day: [["00:00", "24:00"]] for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}


def _at(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def _create(conn: Connection, path: str, headers: dict[str, str], body: Any) -> str:
    reply = await conn.request("POST", path, headers, body)
    if reply.status != 201:
        raise RuntimeError(f"POST {path} answered {reply.status}: {reply.body[:200]!r}")
    return str(reply.json()["id"])


async def _setup(commands: str, headers: dict[str, str], run: str) -> tuple[list[str], list[str]]:
    conn = Connection(commands)
    clinicians = [
        await _create(
            conn,
            "/clinicians",
            headers,
            {
                "name": f"Bench Clinician {run} {i}",
                "email": f"bench-clin-{run}-{i}@bench.carelog.invalid",
                "timezone": "UTC",
                "workingHours": ALWAYS,
            },
        )
        for i in range(CLINICIANS + 1)
    ]
    patients = [
        await _create(
            conn,
            "/patients",
            headers,
            {
                "name": f"Bench Booker {run} {i}",
                "email": f"bench-booker-{run}-{i}@bench.carelog.invalid",
                "address": "1 Bench Road",
                "dateOfBirth": "1980-01-01",
                "registeredDate": "2024-01-02",
            },
        )
        for i in range(PATIENTS + CONTENDED_REQUESTS)
    ]
    await conn.close()
    return clinicians, patients


async def run(settings: Settings) -> list[str]:
    commands = os.environ.get(
        "CARELOG_COMMANDS_URL", f"http://127.0.0.1:{settings.ports['commands']}"
    )
    reads = os.environ.get("CARELOG_READ_API_URL", f"http://127.0.0.1:{settings.ports['read-api']}")
    headers = await token_headers(os.environ.get("CARELOG_AUTH_URL", "http://127.0.0.1:4005"))
    run_id = uuid.uuid4().hex[:6]
    clinicians, patients = await _setup(commands, headers, run_id)
    spread, contended = clinicians[:CLINICIANS], clinicians[CLINICIANS]
    base = (datetime.now(UTC) + timedelta(days=2)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    rng = random.Random(7)
    plan = [
        (
            rng.choice(spread),
            patients[rng.randrange(PATIENTS)],
            base + timedelta(days=rng.randrange(60), minutes=30 * rng.randrange(48)),
        )
        for _ in range(BOOKINGS)
    ]
    outcomes: Counter[int] = Counter()

    async def book(conn: Connection, i: int) -> Any:
        clinician, patient, start = plan[i]
        reply = await conn.request(
            "POST",
            "/appointments",
            headers,
            {
                "patientId": patient,
                "clinicianId": clinician,
                "start": _at(start),
                "durationMinutes": 30,
                "reason": "bench",
            },
        )
        outcomes[reply.status] += 1
        return reply

    floor = await insert_floor(settings)
    booking = await closed_loop(commands, book, BOOKINGS, ok=(201, 409))

    slots = [base + timedelta(days=61, hours=9 + i) for i in range(CONTENDED_SLOTS)]
    fights: Counter[int] = Counter()
    won: list[tuple[str, int]] = []

    async def fight(conn: Connection, i: int) -> Any:
        reply = await conn.request(
            "POST",
            "/appointments",
            headers,
            {
                "patientId": patients[PATIENTS + i],
                "clinicianId": contended,
                "start": _at(slots[i % CONTENDED_SLOTS]),
                "durationMinutes": 60,
                "reason": "bench",
            },
        )
        fights[reply.status] += 1
        if reply.status == 201:
            won.append((reply.json()["id"], int(reply.headers["event-position"])))
        return reply

    contention = await closed_loop(commands, fight, CONTENDED_REQUESTS, ok=(201, 409))
    conn = Connection(reads)
    lost = 0
    for appointment_id, position in won:
        found = await conn.request(
            "GET", f"/appointments/{appointment_id}?minPosition={position}", headers
        )
        lost += found.status != 200
    await conn.close()

    busy_day = (base + timedelta(days=1)).date().isoformat()
    search_path = f"/clinicians/{spread[0]}/slots?date={busy_day}&durationMinutes=30"
    bare = await closed_loop(reads, lambda c, _: c.request("GET", "/health/live"), SEARCHES)
    search = await closed_loop(reads, lambda c, _: c.request("GET", search_path, headers), SEARCHES)
    server_errors = sum(n for status, n in (outcomes + fights).items() if status >= 500)
    return [
        "## Appointments",
        "",
        f"`uv run python -m bench.appointments` (part of `make bench`). {CONCURRENCY} keep-alive"
        " connections, closed loop, straight to the command and query APIs; the relay, both"
        " projections and billing run throughout on the same cores. Same run for every floor.",
        "",
        "| figure | value | floor, same run | ratio |",
        "| --- | --- | --- | --- |",
        f"| book random slots across {CLINICIANS} clinicians, {BOOKINGS} requests | "
        f"{booking.rate:.0f}/s, p50 {ms(booking.p(0.5))}, p99 {ms(booking.p(0.99))}; "
        f"{outcomes[201]} x 201, {outcomes[409]} x 409 | single-row INSERT, own transaction: "
        f"{floor.rate:.0f}/s, p99 {ms(floor.p(0.99))} | {booking.rate / floor.rate:.0%} |",
        f"| {CONCURRENCY} clients fighting over the same {CONTENDED_SLOTS} slots,"
        f" {CONTENDED_REQUESTS} requests | {contention.rate:.0f}/s, p99"
        f" {ms(contention.p(0.99))}; {fights[201]} x 201, {fights[409]} x 409,"
        f" {server_errors} x 5xx; {lost} of {len(won)} bookings missing from the read model"
        " | (same floor) | — |",
        f"| free-slot search (a day with bookings), {SEARCHES} requests | {search.rate:.0f}/s,"
        f" p50 {ms(search.p(0.5))}, p99 {ms(search.p(0.99))} | bare endpoint (GET"
        f" /health/live): {bare.rate:.0f}/s, p99 {ms(bare.p(0.99))} |"
        f" p99 {search.p(0.99) / bare.p(0.99):.2f}x the bare p99 |",
        "",
        f"Under contention exactly {CONTENDED_SLOTS} bookings may win; 409s are the others.",
        "",
    ]


if __name__ == "__main__":
    main_for(run)
