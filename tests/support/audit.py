"""Waiting for the disclosure audit's spool (runtime.audit_spool) to reach its table."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg

from runtime.audit_spool import MARKS, spooled, store_name, unshipped
from runtime.settings import Settings


def shipped(settings: Settings, timeout: float = 15.0) -> None:
    """Waits until every record spooled so far for the settings' database in its spool
    directory is in `audit.disclosures`: what a read appended before its answer is then
    in the table. AssertionError after `timeout`."""
    directory = Path(settings.audit_spool_dir)
    sizes = spooled(directory, store_name(settings.database_url))
    deadline = time.monotonic() + timeout
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        while sizes:
            marks = dict(conn.execute(MARKS, [list(sizes)]).fetchall())
            sizes = unshipped(directory, sizes, marks)
            if sizes:
                assert time.monotonic() < deadline, f"spool segments not shipped: {sorted(sizes)}"
                time.sleep(0.01)
