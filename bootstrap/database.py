"""The database's schema, versioned: `carelog db migrate` and `carelog db status`.

Every table, index and function carelog keeps in PostgreSQL is created by a
numbered SQL file in `bootstrap/migrations/`, applied once and in order and
recorded in the database itself. A schema change is a new file, never an edit to
an applied one. `make up` and the tests migrate before any service starts; a
service that finds its database behind refuses to start and says so in one line.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from yoyo import get_backend, read_migrations

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


class DatabaseBehind(Exception):
    """The database lacks migrations this code needs."""


@dataclass(frozen=True)
class Migration:
    id: str
    applied_at: datetime | None


def _yoyo_url(database_url: str) -> str:
    parts = urlsplit(database_url)
    return urlunsplit(parts._replace(scheme="postgresql+psycopg"))


@contextmanager
def _backend(database_url: str) -> Iterator[Any]:
    backend = get_backend(_yoyo_url(database_url))
    try:
        yield backend
    finally:
        backend.connection.close()


def migrate(database_url: str) -> list[str]:
    """Applies what is pending, in order, under yoyo's lock; returns the ids applied."""
    migrations = read_migrations(str(MIGRATIONS))
    with _backend(database_url) as backend, backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
        return [m.id for m in pending]


def status(database_url: str) -> list[Migration]:
    """Every migration this code knows, with when it was applied (None: pending)."""
    migrations = read_migrations(str(MIGRATIONS))
    with _backend(database_url) as backend:
        backend.ensure_internal_schema_updated()
        cursor = backend.execute(
            f"SELECT migration_id, applied_at_utc FROM {backend.migration_table_quoted}"
        )
        applied = dict(cursor.fetchall())
        return [Migration(m.id, applied.get(m.id)) for m in migrations]


def require_current(database_url: str) -> None:
    """Raises DatabaseBehind when a migration this code knows has not been applied."""
    pending = [m.id for m in status(database_url) if m.applied_at is None]
    if pending:
        raise DatabaseBehind(
            f"the database lacks migration(s) {', '.join(pending)}: run `carelog db migrate`"
        )


def with_database(url: str, name: str) -> str:
    """`url` with its database replaced by `name`."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def create_database(admin_url: str, name: str) -> str:
    """Creates a database (a test's or a benchmark's scratch one) on `admin_url`'s server
    and migrates it; returns its URL."""
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = with_database(admin_url, name)
    migrate(url)
    return url


def drop_database(admin_url: str, name: str) -> None:
    """Drops a database (a test's or a benchmark's scratch one), connected as `admin_url`;
    retried while a server-side worker (autovacuum) is inside it, which only a superuser
    could end."""
    for attempt in range(20):
        try:
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except psycopg.errors.InsufficientPrivilege:
            if attempt == 19:
                raise
            time.sleep(0.25)
