"""Typed settings, read from the environment once when a process starts.

Every variable is named `CARELOG_*`. Development mode (`CARELOG_ENV=development`)
fills in the local stack's addresses; production mode requires each of them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

DEVELOPMENT = "development"
PRODUCTION = "production"

_DEV_DEFAULTS = {
    "CARELOG_DATABASE_URL": "postgresql://carelog:carelog@127.0.0.1:5432/carelog",
    "CARELOG_REDIS_URL": "redis://127.0.0.1:6379/0",
    "CARELOG_KAFKA_BOOTSTRAP": "127.0.0.1:9092",
}


class SettingsError(Exception):
    """A required setting is missing or malformed."""


@dataclass(frozen=True)
class Settings:
    """Where the process finds its infrastructure and how it behaves."""

    env: str
    database_url: str
    redis_url: str
    kafka_bootstrap: str
    topic_prefix: str = ""
    """Prefixed to every topic name; lets tests run beside a live stack."""
    log_level: str = "info"
    read_wait_seconds: float = 5.0
    """How long the query API waits for `minPosition` before answering 503."""
    cache_ttl_seconds: int = 60
    http_host: str = "127.0.0.1"
    ports: Mapping[str, int] = field(
        default_factory=lambda: {
            "commands": 4000,
            "read-api": 4003,
            "relay": 4010,
            "projection": 4011,
        }
    )

    @property
    def development(self) -> bool:
        return self.env == DEVELOPMENT

    @property
    def cache_prefix(self) -> str:
        """Redis keys of this environment; the topic prefix keeps test runs apart."""
        return f"carelog:{self.topic_prefix}"

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        source = os.environ if environ is None else environ
        env = source.get("CARELOG_ENV", PRODUCTION).strip().lower()
        if env not in (DEVELOPMENT, PRODUCTION):
            raise SettingsError(f"CARELOG_ENV must be {DEVELOPMENT!r} or {PRODUCTION!r}")

        def need(key: str) -> str:
            value = source.get(key) or (_DEV_DEFAULTS.get(key) if env == DEVELOPMENT else None)
            if not value:
                raise SettingsError(f"{key} is required in {env} mode")
            return value

        ports = {
            "commands": int(source.get("CARELOG_COMMANDS_PORT", 4000)),
            "read-api": int(source.get("CARELOG_READ_API_PORT", 4003)),
            "relay": int(source.get("CARELOG_RELAY_PORT", 4010)),
            "projection": int(source.get("CARELOG_PROJECTION_PORT", 4011)),
        }
        return cls(
            env=env,
            database_url=need("CARELOG_DATABASE_URL"),
            redis_url=need("CARELOG_REDIS_URL"),
            kafka_bootstrap=need("CARELOG_KAFKA_BOOTSTRAP"),
            topic_prefix=source.get("CARELOG_TOPIC_PREFIX", ""),
            log_level=source.get("CARELOG_LOG_LEVEL", "info"),
            read_wait_seconds=float(source.get("CARELOG_READ_WAIT_SECONDS", 5.0)),
            cache_ttl_seconds=int(source.get("CARELOG_CACHE_TTL_SECONDS", 60)),
            http_host=source.get("CARELOG_HTTP_HOST", "127.0.0.1"),
            ports=ports,
        )
