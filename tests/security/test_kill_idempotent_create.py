"""Kill -9 of the command API in the middle of an idempotent create, then the client's retry.

A real command API process (and auth, for its keys) on an isolated database. The client
sends `POST /patients` with an `Idempotency-Key` and never reads the answer; the process
is SIGKILLed at a chosen point, started again, and the client retries with the same key
and body. Two points, each reached for certain rather than by timing:

- after the registration committed: the client waits until the patient is in the store,
  then the kill; its answer is lost. The retry answers 201 with that patient; without
  the key the same retry would be refused (409) by the client's own patient.
- after the key's row committed but before the registration did: the test holds a lock
  on the event store so the save waits, kills the process there, then lets go. Nothing
  was stored; the retry registers the patient under the id the key had fixed.

Either way the store holds exactly one patient.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from domain.roles import Role
from runtime.settings import Settings
from tests.support.patients import body
from tests.support.stack import Process, eventually, isolated_settings, with_own_auth
from tests.support.tokens import TestTokens

pytestmark = [pytest.mark.integration, pytest.mark.fault]

REGISTERED = "domain.patients:Patient.Registered"


@contextmanager
def command_api(tmp: Path) -> Iterator[tuple[Settings, Process, dict[str, str]]]:
    """An isolated database, auth (for the keys) and the command API as real processes."""
    with isolated_settings("ki") as settings:
        settings, env = with_own_auth(settings, tmp / "keys")
        tokens = TestTokens(tmp / "keys")
        auth = Process(["serve", "auth"], settings, "auth", tmp / "auth", env=env).start()
        commands = Process(["serve", "commands"], settings, "commands", tmp / "commands", env=env)
        try:
            commands.start()
            yield settings, commands, tokens.headers(Role.RECEPTIONIST, str(uuid.uuid4()))
        finally:
            commands.stop()
            auth.stop()


async def send_without_reading(
    settings: Settings, headers: dict[str, str], payload: dict[str, Any]
) -> asyncio.StreamWriter:
    """Sends POST /patients and leaves its answer unread (the caller closes the stream)."""
    data = json.dumps(payload).encode()
    lines = [
        "POST /patients HTTP/1.1",
        f"Host: 127.0.0.1:{settings.ports['commands']}",
        "Content-Type: application/json",
        f"Content-Length: {len(data)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    _, writer = await asyncio.open_connection("127.0.0.1", settings.ports["commands"])
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
    await writer.drain()
    return writer


def registered(settings: Settings) -> list[uuid.UUID]:
    with psycopg.connect(settings.database_url) as db:
        rows = db.execute(
            "SELECT originator_id FROM carelog_events WHERE topic = %s", [REGISTERED]
        ).fetchall()
    return [row[0] for row in rows]


def reserved(settings: Settings, key: str) -> uuid.UUID | None:
    with psycopg.connect(settings.database_url) as db:
        row = db.execute(
            "SELECT resource_id FROM idempotency_keys WHERE key = %s", [key]
        ).fetchone()
    return None if row is None else row[0]


async def retry(settings: Settings, headers: dict[str, str], payload: Any) -> httpx.Response:
    url = f"http://127.0.0.1:{settings.ports['commands']}"
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as client:
        return await client.post("/patients", json=payload)


async def test_a_retry_after_a_kill_that_lost_the_answer_gets_the_same_patient(tmp_path: Path):
    with command_api(tmp_path) as (settings, commands, auth):
        key, payload = str(uuid.uuid4()), body()
        headers = {**auth, "Idempotency-Key": key}
        stream = await send_without_reading(settings, headers, payload)

        async def stored() -> list[uuid.UUID]:
            return await asyncio.to_thread(registered, settings)

        (patient_id,) = await eventually(stored, timeout=30)
        commands.kill()  # the answer, if it was even written, is never read
        stream.close()
        commands.start()

        unkeyed = await retry(settings, auth, payload)
        assert unkeyed.status_code == 409, unkeyed.text  # what a retry without a key meets
        answer = await retry(settings, headers, payload)
        assert answer.status_code == 201, answer.text
        assert answer.json()["id"] == str(patient_id)
        assert registered(settings) == [patient_id]


async def test_a_retry_after_a_kill_before_the_commit_registers_once(tmp_path: Path):
    with command_api(tmp_path) as (settings, commands, auth):
        key, payload = str(uuid.uuid4()), body()
        headers = {**auth, "Idempotency-Key": key}
        with psycopg.connect(settings.database_url) as lock:
            # Every save waits on this lock: the key's row commits, the registration cannot.
            lock.execute("LOCK TABLE carelog_events IN EXCLUSIVE MODE")
            stream = await send_without_reading(settings, headers, payload)

            async def key_committed() -> uuid.UUID | None:
                return await asyncio.to_thread(reserved, settings, key)

            fixed = await eventually(key_committed, timeout=30)
            commands.kill()
            stream.close()
            lock.rollback()
        assert registered(settings) == []
        commands.start()

        answer = await retry(settings, headers, payload)
        assert answer.status_code == 201, answer.text
        assert answer.json()["id"] == str(fixed)
        again = await retry(settings, headers, payload)
        assert again.status_code == 201, again.text
        assert again.json()["id"] == str(fixed)
        assert registered(settings) == [fixed]
