"""The event store: the `eventsourcing` application that holds every aggregate.

It is also the outbox. The relay reads its global log (notification ids are the
events' positions) and publishes what it finds.
"""

from __future__ import annotations

from datetime import date
from typing import Any
from urllib.parse import unquote, urlsplit

from eventsourcing.application import Application
from eventsourcing.persistence import JSONTranscoder, Transcoding


class DateAsISO(Transcoding):
    type = date
    name = "date_iso"

    def encode(self, obj: date) -> str:
        return obj.isoformat()

    def decode(self, data: str) -> date:
        return date.fromisoformat(data)


def postgres_env(database_url: str, pool_size: int = 10) -> dict[str, str]:
    """The `eventsourcing` settings for a PostgreSQL URL."""
    url = urlsplit(database_url)
    return {
        "PERSISTENCE_MODULE": "eventsourcing.postgres",
        "POSTGRES_DBNAME": unquote(url.path.lstrip("/")),
        "POSTGRES_HOST": url.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(url.port or 5432),
        "POSTGRES_USER": unquote(url.username or ""),
        "POSTGRES_PASSWORD": unquote(url.password or ""),
        "POSTGRES_POOL_SIZE": str(pool_size),
        "POSTGRES_MAX_OVERFLOW": str(pool_size),
        "POSTGRES_CONNECT_TIMEOUT": "5",
        "POSTGRES_LOCK_TIMEOUT": "5",
        "POSTGRES_PRE_PING": "y",
        "CREATE_TABLE": "n",  # the migrations create the store
    }


MEMORY_ENV = {"PERSISTENCE_MODULE": "eventsourcing.popo"}
"""The `eventsourcing` settings of a store held in this process's memory (for tests)."""


class EventStore(Application[Any]):
    """All of carelog's aggregates; its table is `carelog_events`."""

    name = "carelog"

    def __init__(self, database_url: str, pool_size: int = 10):
        super().__init__(env=postgres_env(database_url, pool_size))

    @classmethod
    def in_memory(cls) -> EventStore:
        """An empty store in this process's memory: nothing is shared, nothing outlives it.

        Its positions (notification ids) count 1, 2, 3, ... with no gaps, where PostgreSQL's
        may skip numbers; it has no table, so nothing that reads SQL can use it.
        """
        store = cls.__new__(cls)
        Application.__init__(store, env=MEMORY_ENV)
        return store

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(DateAsISO())

    @property
    def events_table(self) -> str:
        return f"{self.name}_events"

    def close(self) -> None:
        super().close()
