"""Versioned schema: migrations apply once, in order; a service refuses a database behind."""

from __future__ import annotations

import subprocess
import sys
import uuid

import psycopg

from bootstrap.database import MIGRATIONS, migrate, status, with_database
from tests.support.stack import ROOT, base_settings, env_for


def _scratch_database() -> str:
    base = base_settings()
    name = f"m{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base.database_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return name


def _drop(name: str) -> None:
    with psycopg.connect(base_settings().database_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_migrate_applies_every_file_once_in_order_and_status_says_so():
    name = _scratch_database()
    url = with_database(base_settings().database_url, name)
    try:
        files = sorted(p.stem for p in MIGRATIONS.glob("*.sql"))
        assert [m.id for m in status(url)] == files
        assert all(m.applied_at is None for m in status(url))

        assert migrate(url) == files
        assert all(m.applied_at is not None for m in status(url))
        assert migrate(url) == []

        with psycopg.connect(url) as conn:
            tables = {
                row[0]
                for row in conn.execute(
                    "SELECT schemaname || '.' || tablename FROM pg_tables"
                    " WHERE schemaname IN ('public', 'auth', 'billing')"
                )
            }
        assert {
            "public.carelog_events",
            "public.directory_patients",
            "public.projection_tracking",
            "public.relay_positions",
            "auth.users",
            "billing.accounts",
            "billing.outbox",
        } <= tables
    finally:
        _drop(name)


def test_a_service_refuses_a_database_that_lacks_migrations(settings):
    name = _scratch_database()
    try:
        env = {
            **env_for(settings),
            "CARELOG_DATABASE_URL": with_database(settings.database_url, name),
        }
        done = subprocess.run(
            [sys.executable, "-m", "bootstrap", "relay"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        assert "carelog db migrate" in done.stderr
        assert "Traceback" not in done.stderr
    finally:
        _drop(name)


def test_carelog_db_status_lists_pending_migrations_and_fails_until_migrated(settings):
    name = _scratch_database()
    try:
        env = {
            **env_for(settings),
            "CARELOG_DATABASE_URL": with_database(settings.database_url, name),
        }

        def carelog(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "bootstrap", *args],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )

        before = carelog("db", "status")
        assert before.returncode == 1
        assert before.stdout.count("pending") == len(list(MIGRATIONS.glob("*.sql")))
        assert carelog("db", "migrate").returncode == 0
        after = carelog("db", "status")
        assert after.returncode == 0, after.stdout + after.stderr
        assert "pending" not in after.stdout
    finally:
        _drop(name)
