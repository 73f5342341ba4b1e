"""The event store: the `eventsourcing` application that holds every aggregate.

It is also the outbox. The relay reads its global log (notification ids are the
events' positions) and publishes what it finds.

The command process keeps the aggregates it wrote last in memory (`cache_size`), so
a command on a known aggregate costs no read at all: `load` hands out a copy of the
cached state. That copy may be stale when another process wrote since, and the save
says so: the store's version check refuses it (IntegrityError). The retry then runs
`fresh()`, reading every aggregate from the store again. A command that refuses
(a 404, 409 or 412) refuses on fresh state too: its first answer is retried fresh
(see `commands.service.retrying`). An aggregate a command only reads, and does not
save, is loaded `current=True`: brought up to date from the store with the events
after its cached version (one indexed query that usually returns nothing).

Personal fields (`domain.privacy`) are sealed with their patient's data key on the way
into the store and its snapshots, and opened on the way out (`SealingMapper`): the
aggregates hold them in the clear, the tables never do. The relay reads through
`sealed_mapper`, which leaves them sealed, so Kafka carries them sealed too.

Reading an aggregate that is not cached replays its events after its newest
snapshot: one is taken every SNAPSHOT_INTERVAL versions, so the cost of a read does
not grow with history.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Sequence
from copy import deepcopy
from datetime import date
from typing import Any
from urllib.parse import unquote, urlsplit
from uuid import UUID

import structlog
from eventsourcing.application import AggregateNotFoundError, Application, project_aggregate
from eventsourcing.domain import Aggregate, DomainEventProtocol, Snapshot
from eventsourcing.persistence import JSONTranscoder, Mapper, StoredEvent, Transcoding
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import get_topic
from psycopg.sql import SQL, Composable, Identifier

from domain.patients import Patient
from domain.privacy import SNAPSHOTS, STORED, Personal
from runtime.crypto import Keyring
from runtime.db import rendered

log = structlog.get_logger(__name__)

SNAPSHOT_INTERVAL = 50
"""Versions between two snapshots of an aggregate."""

CACHE_SIZE = 20_000
"""Aggregates the command process keeps in memory (a patient's state is ~1 KB)."""

_fresh = threading.local()


@contextlib.contextmanager
def fresh() -> Iterator[None]:
    """Within it, this thread's `load`s read from the store, not from the cache."""
    before = getattr(_fresh, "on", False)
    _fresh.on = True
    try:
        yield
    finally:
        _fresh.on = before


class DateAsISO(Transcoding):
    type = date
    name = "date_iso"

    def encode(self, obj: date) -> str:
        return obj.isoformat()

    def decode(self, data: str) -> date:
        return date.fromisoformat(data)


def postgres_env(database_url: str, pool_size: int = 10, cache_size: int = 0) -> dict[str, str]:
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
        # No ping per checkout (a round trip per statement): a connection broken by a
        # restart fails its statement, which the recorder retries on a new connection.
        "POSTGRES_PRE_PING": "n",
        "CREATE_TABLE": "n",  # the migrations create the store
        "IS_SNAPSHOTTING_ENABLED": "y",
        "APPLICATION_RECORDER_TOPIC": "commands.store:KeyedRecorder",
        **(
            {"AGGREGATE_CACHE_MAXSIZE": str(cache_size), "AGGREGATE_CACHE_FASTFORWARD": "n"}
            if cache_size
            else {}
        ),
    }


MEMORY_ENV = {"PERSISTENCE_MODULE": "eventsourcing.popo", "IS_SNAPSHOTTING_ENABLED": "y"}
"""The `eventsourcing` settings of a store held in this process's memory (for tests)."""


def _personal(domain_event: object) -> tuple[Personal, dict[str, Any]] | None:
    """The personal fields of an event (or snapshot) and the dict that holds them."""
    if isinstance(domain_event, Snapshot):
        personal = SNAPSHOTS.get(domain_event.topic)
        return None if personal is None else (personal, domain_event.state)
    personal = STORED.get(get_topic(type(domain_event)))
    return None if personal is None else (personal, vars(domain_event))


def _new_subjects(objs: Iterable[Any]) -> Iterator[UUID]:
    """The patients whose first event is among `objs` (events or aggregates): their keys
    are new."""
    for obj in objs:
        for domain_event in getattr(obj, "pending_events", None) or [obj]:
            if (
                isinstance(domain_event, Patient.Registered)
                and domain_event.originator_version == 1
            ):
                yield domain_event.originator_id


class KeyedRecorder(PostgresApplicationRecorder):
    """The store's recorder: also inserts new subjects' data keys, in the events'
    transaction (a conflict fails the save, as a conflicting event would).

    Its statements are the library's, rendered once (psycopg renders a composed
    statement again at every execute), and its events go to PostgreSQL as four arrays,
    dumped by psycopg's compiled dumpers: the library sends one array of a composite
    type, which psycopg dumps value by value in Python. The transaction is the same:
    the table locked (so positions commit in order), its channel notified, the events
    inserted, their positions returned.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._lock_statements = [
            rendered(s) if isinstance(s, Composable) else s for s in self.lock_table_statements
        ]
        self._notify = rendered(SQL("NOTIFY {0}").format(Identifier(self.channel_name)))
        self._insert = rendered(
            SQL(
                "INSERT INTO {0}.{1} AS t (originator_id, originator_version, topic, state)"
                " SELECT * FROM unnest(%b::uuid[], %b::bigint[], %b::text[], %b::bytea[])"
                " RETURNING notification_id"
            ).format(Identifier(self.datastore.schema), Identifier(self.events_table_name))
        )

    def _lock_table(self, curs: Any) -> None:
        for statement in self._lock_statements:
            curs.execute(statement, prepare=True)

    def _notify_channel(self, curs: Any) -> None:
        curs.execute(self._notify, prepare=True)

    def _insert_stored_events(self, curs: Any, stored_events: Any, **kwargs: Any) -> None:
        self._lock_table(curs)
        self._notify_channel(curs)
        curs.execute(
            self._insert,
            [
                [e.originator_id for e in stored_events],
                [e.originator_version for e in stored_events],
                [e.topic for e in stored_events],
                [e.state for e in stored_events],
            ],
            prepare=True,
        )

    def _insert_events(
        self,
        curs: Any,
        stored_events: Any,
        subject_keys: Sequence[tuple[UUID, bytes]] = (),
        **kwargs: Any,
    ) -> None:
        super()._insert_events(curs, stored_events, **kwargs)
        if subject_keys:
            # One statement for the batch's keys, not one per key: less work for both sides.
            curs.execute(
                "INSERT INTO subject_keys (subject_id, wrapped)"
                " SELECT * FROM unnest(%b::uuid[], %b::bytea[])",
                [[subject for subject, _ in subject_keys], [key for _, key in subject_keys]],
            )


class SealingMapper(Mapper[UUID]):
    """Seals personal fields as events and snapshots are stored; opens them as they are
    read (unless `opens` is False: the relay publishes them sealed).

    A field of an erased patient opens to None: the aggregate keeps its history (ids,
    types, times) and nothing personal.
    """

    def __init__(self, transcoder: Any, keyring: Keyring, opens: bool = True):
        super().__init__(transcoder=transcoder)
        self.keyring = keyring
        self.opens = opens

    def to_stored_event(self, domain_event: DomainEventProtocol[UUID]) -> StoredEvent:
        found = _personal(domain_event)
        if found is None:
            return super().to_stored_event(domain_event)
        personal, state = found
        state = dict(state)
        subject = personal.subject_of(domain_event.originator_id, state)
        if subject is not None:
            self.keyring.seal_fields(personal, subject, state)
        copy = object.__new__(type(domain_event))
        if isinstance(domain_event, Snapshot):
            object.__setattr__(copy, "__dict__", {**vars(domain_event), "state": state})
        else:
            object.__setattr__(copy, "__dict__", state)
        return super().to_stored_event(copy)

    def to_domain_event(self, stored_event: StoredEvent) -> DomainEventProtocol[UUID]:
        domain_event = super().to_domain_event(stored_event)
        if self.opens:
            found = _personal(domain_event)
            if found is not None:
                self.keyring.open_fields(*found)
        return domain_event


class EventStore(Application[Any]):
    """All of carelog's aggregates; its table is `carelog_events`.

    With a `keyring`, personal fields are stored sealed (see SealingMapper); without one
    (the in-memory store of unit tests, and a benchmark's baseline) they are stored as
    they are.
    """

    name = "carelog"

    def __init__(
        self,
        database_url: str,
        pool_size: int = 10,
        cache_size: int = 0,
        keyring: Keyring | None = None,
    ):
        self.keyring = keyring
        self.keys_with_events = True
        super().__init__(env=postgres_env(database_url, pool_size, cache_size))

    @classmethod
    def in_memory(cls, keyring: Keyring | None = None) -> EventStore:
        """An empty store in this process's memory: nothing is shared, nothing outlives it.

        Its positions (notification ids) count 1, 2, 3, ... with no gaps, where PostgreSQL's
        may skip numbers; it has no table, so nothing that reads SQL can use it.
        """
        store = cls.__new__(cls)
        store.keyring = keyring
        store.keys_with_events = False  # no table to insert them in: made on first seal
        Application.__init__(store, env=MEMORY_ENV)
        return store

    def construct_mapper(self) -> Mapper[UUID]:
        if self.keyring is None:
            return super().construct_mapper()
        return SealingMapper(self.construct_transcoder(), self.keyring)

    def save(self, *objs: Any, **kwargs: Any) -> Any:
        """Saves; new patients' data keys are stored in the same transaction as their first
        events (no round trip of their own)."""
        if self.keyring is None or not self.keys_with_events:
            return super().save(*objs, **kwargs)
        minted = self.keyring.mint(_new_subjects(objs))
        try:
            return super().save(*objs, subject_keys=minted, **kwargs)
        except BaseException:
            for subject, _ in minted:
                self.keyring.forget(subject)
            raise

    @property
    def sealed_mapper(self) -> Mapper[UUID]:
        """Reads stored events with their personal fields still sealed (for publishing)."""
        if self.keyring is None:
            return self.mapper
        return Mapper(transcoder=self.mapper.transcoder)

    def register_transcodings(self, transcoder: JSONTranscoder) -> None:
        super().register_transcodings(transcoder)
        transcoder.register(DateAsISO())

    @property
    def caches(self) -> bool:
        """Whether `load` may answer from memory (and so may be stale)."""
        return self.repository.cache is not None

    def knows(self, aggregate_id: UUID) -> bool:
        """Whether the aggregate is in the cache (so it exists)."""
        cache = self.repository.cache
        return cache is not None and aggregate_id in cache.cache

    def cached(self, aggregate_id: UUID) -> Any | None:
        """A copy of the cached aggregate, to decide on as `load`'s; None when it is not
        cached. Never reads the store, so an event loop may call it.

        A copy, as `load` hands out: the command changes it, and the cache holds the
        saved state only once a save has stored it (`remember`), never a failed one's.
        """
        cache = self.repository.cache
        if cache is None or getattr(_fresh, "on", False):
            return None
        try:
            aggregate = cache.get(aggregate_id)
        except KeyError:
            return None
        return deepcopy(aggregate)

    def load(self, aggregate_id: UUID, *, current: bool = False) -> Any:
        """The aggregate, to decide on: cached when known, read from the store when not.

        `current=True` for an aggregate the command reads but will not save (so no
        version check would notice a stale copy): brought up to date first.
        Raises AggregateNotFoundError.
        """
        cache = self.repository.cache
        if cache is None:
            return self.repository.get(aggregate_id)
        if getattr(_fresh, "on", False):
            with contextlib.suppress(KeyError):
                cache.get(aggregate_id, evict=True)
            return self.repository.get(aggregate_id)
        if not current:
            return self.repository.get(aggregate_id)
        try:
            cached = cache.get(aggregate_id)
        except KeyError:
            return self.repository.get(aggregate_id)
        newer = self.events.get(originator_id=aggregate_id, gt=cached.version)
        aggregate = project_aggregate(deepcopy(cached), newer)
        if aggregate is None:
            raise AggregateNotFoundError(aggregate_id)
        return aggregate

    def remember(self, saved: Iterable[tuple[Aggregate, int]]) -> None:
        """After a save of (aggregate, events it added) pairs: caches the saved states,
        and snapshots each aggregate that passed a multiple of SNAPSHOT_INTERVAL.

        The cached object is the one saved; `load` hands out copies of it.
        """
        cache = self.repository.cache
        for aggregate, added in saved:
            if cache is not None:
                try:
                    known = cache.get(aggregate.id).version
                except KeyError:
                    known = 0
                if aggregate.version > known:
                    cache.put(aggregate.id, aggregate)
            before = aggregate.version - added
            if self.snapshots is not None and (
                aggregate.version // SNAPSHOT_INTERVAL > before // SNAPSHOT_INTERVAL
            ):
                try:
                    self.snapshots.put([type(aggregate).Snapshot.take(aggregate)])
                except Exception as exc:  # the save stands; the next interval snapshots
                    log.warning("snapshot not taken", error=type(exc).__name__)

    def position_of(self, aggregate_id: UUID, version: int) -> int | None:
        """The global position of an aggregate's event (None in a store in memory)."""
        datastore = getattr(self.recorder, "datastore", None)
        if datastore is None:
            return None
        with datastore.transaction(commit=False) as cursor:
            cursor.execute(
                f"SELECT notification_id FROM {self.events_table}"
                " WHERE originator_id = %s AND originator_version = %s",
                [aggregate_id, version],
            )
            row = cursor.fetchone()
        return None if row is None else int(row["notification_id"])

    @property
    def events_table(self) -> str:
        return f"{self.name}_events"

    def close(self) -> None:
        super().close()
