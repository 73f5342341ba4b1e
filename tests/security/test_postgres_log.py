"""The local PostgreSQL server's log keeps no values: a unique violation logs no key.

A unique-key violation's DETAIL line quotes the key (for the email claim, the email), and
a failed statement's text or parameters carry whatever the client sent. The local cluster
(ops/local/postgres/postgresql.conf) logs the error's message only; this reads the log the
stack writes (.stack/logs/postgres.log) after causing such a violation.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.support.stack import ROOT, base_settings

pytestmark = pytest.mark.integration

LOG = ROOT / ".stack" / "logs" / "postgres.log"


def _new_lines(log: Path, offset: int, expected: str, timeout: float = 15.0) -> str:
    """The log written after `offset`, once `expected` is in it (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        with log.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", errors="replace")
        if expected in text or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def test_a_unique_violation_leaves_no_key_in_the_server_log():
    if not LOG.is_file():
        pytest.skip(f"no PostgreSQL log at {LOG}: the cluster is not the local stack's")
    token = uuid.uuid4().hex
    email = f"log-marker-{token}@example.org"
    constraint = f"marker_{token}_unique"
    offset = LOG.stat().st_size
    with psycopg.connect(base_settings().database_url, autocommit=True) as conn:
        conn.execute(f"CREATE TEMPORARY TABLE marker (email text CONSTRAINT {constraint} UNIQUE)")
        conn.execute("INSERT INTO marker (email) VALUES (%s)", (email,))
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO marker (email) VALUES (%s)", (email,))
        # The value written into the statement itself, as a hand-written query would.
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(f"INSERT INTO marker (email) VALUES ('{email}')")
    written = _new_lines(LOG, offset, f'"{constraint}"')
    assert written.count(f'"{constraint}"') == 2, (
        f"{LOG} did not record the two violations: is it this server's log?"
    )
    assert f"log-marker-{token}" not in written
