"""The keyring: one data key per patient (subject), for crypto-shredding.

Personal fields (see `domain.privacy`) are sealed with AES-GCM under their subject's
own 256-bit data key, with the subject and the field name as associated data, so a
sealed value cannot be moved to another patient or field. Data keys live in the
`subject_keys` table wrapped (AES-GCM again) under the master key from settings
(CARELOG_MASTER_KEY): the database alone opens nothing.

Erasing a subject deletes its wrapped key and keeps a tombstone row (so no key is ever
made for it again), then NOTIFYs `carelog_subject_keys` so that every process drops
the key it holds in memory. From then on every sealed copy of that subject's fields,
in the store, its snapshots, Kafka's topics or any backup, opens to None.

Keys are kept in a bounded in-memory cache; a key read from the table stays wrapped until
a field is opened with it. The first seal for a subject makes its key
with INSERT ... ON CONFLICT DO NOTHING and reads back the row that won, so concurrent
first registrations of one subject agree on one key.
"""

from __future__ import annotations

import base64
import binascii
import os
import threading
from collections import OrderedDict
from collections.abc import Collection, Iterable
from typing import Any
from uuid import UUID

import msgspec
import psycopg
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from psycopg_pool import ConnectionPool

from domain import contracts
from domain.privacy import (
    SEALED_PREFIX,
    Personal,
    as_text,
    in_clear,
    is_sealed,
    subject_of_token,
)
from runtime.settings import Settings, SettingsError, master_key_bytes

log = structlog.get_logger(__name__)

CHANNEL = "carelog_subject_keys"
"""The channel on which an erasure is announced (payload: the subject id)."""

CACHE_SIZE = 50_000
"""Data keys a process keeps in memory (about 100 bytes each)."""

_NONCE = 12
_KEY = 32
_WRAP_AAD = b"carelog:subject-key:"

_Entry = AESGCM | bytes | None
"""What the cache holds about a subject: its data key; the key still wrapped, as read from
the table (unwrapped when first used: a reader that opens none of a subject's fields never
pays for it); or None, erased."""


class _Nonces:
    """Random 96-bit nonces, drawn from the system's source a few hundred at a time.

    Each draw is a system call that lets go of the GIL, and the thread that seals a group
    commit's records is the one committing it: a draw per record would make it wait for
    the GIL behind every other writer, once per record. A forked child never reuses the
    parent's bytes (the same nonce under the same key would expose both values).
    """

    _DRAW = 341 * _NONCE

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = 0
        self._bytes = b""
        self._at = 0

    def take(self, count: int) -> bytes:
        """`count` nonces, one after the other; never handed out twice."""
        size = count * _NONCE
        with self._lock:
            if self._pid != os.getpid() or self._at + size > len(self._bytes):
                self._bytes = os.urandom(max(self._DRAW, size))
                self._at, self._pid = 0, os.getpid()
            self._at += size
            return self._bytes[self._at - size : self._at]


class SubjectErased(Exception):
    """The subject's key is destroyed: nothing can be sealed for it any more."""

    def __init__(self, subject: UUID):
        super().__init__(f"subject {subject} is erased")
        self.subject = subject


class UnreadableToken(Exception):
    """A value that looks sealed but cannot be opened (damaged, or another master key)."""


def parse_master_key(encoded: str) -> bytes:
    """The 32-byte master key from its base64 or hex form; ValueError if it is neither."""
    return master_key_bytes(encoded)


class Keyring:
    """Seals and opens subjects' personal fields; destroys a subject's key to erase it."""

    def __init__(self, master_key: bytes, database_url: str, cache_size: int = CACHE_SIZE):
        self._master = AESGCM(master_key)
        self._database_url = database_url
        self._pool: ConnectionPool[Any] | None = None
        self._cache: OrderedDict[UUID, _Entry] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None
        self._nonces = _Nonces()

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        """The keyring of the settings' master key; SettingsError if there is none (production
        has no default: see runtime.settings)."""
        if not settings.master_key:
            raise SettingsError(
                "CARELOG_MASTER_KEY is required: 32 random bytes in base64"
                " (`openssl rand -base64 32`), the same for every process"
            )
        return cls(parse_master_key(settings.master_key), settings.database_url)

    # --- keys -------------------------------------------------------------------------

    def _db(self) -> ConnectionPool[Any]:
        with self._lock:
            if self._pool is None:
                self._pool = ConnectionPool(
                    self._database_url,
                    min_size=1,
                    max_size=4,
                    kwargs={"autocommit": True},
                    open=True,
                )
            return self._pool

    def _cached(self, subject: UUID) -> tuple[bool, _Entry]:
        with self._lock:
            if subject in self._cache:
                self._cache.move_to_end(subject)
                return True, self._cache[subject]
        return False, None

    def _remember(self, subject: UUID, key: _Entry) -> None:
        with self._lock:
            self._cache[subject] = key
            self._cache.move_to_end(subject)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def forget(self, subject: UUID) -> None:
        """Drops what this process holds about the subject's key (it is read again)."""
        with self._lock:
            self._cache.pop(subject, None)

    def _wrap(self, subject: UUID, key: bytes) -> bytes:
        nonce = self._nonces.take(1)
        return nonce + self._master.encrypt(nonce, key, _WRAP_AAD + subject.bytes)

    def _unwrap(self, subject: UUID, wrapped: bytes) -> AESGCM:
        try:
            key = self._master.decrypt(
                wrapped[:_NONCE], wrapped[_NONCE:], _WRAP_AAD + subject.bytes
            )
        except InvalidTag:
            raise UnreadableToken("a data key does not open with this master key") from None
        return AESGCM(key)

    def _usable(self, subject: UUID, entry: _Entry) -> AESGCM | None:
        """The data key of a cache entry, unwrapped (and so remembered) if it is not yet."""
        if not isinstance(entry, bytes):
            return entry
        key = self._unwrap(subject, entry)
        with self._lock:
            # Only in place of the same entry: an erasure may have dropped it meanwhile.
            if self._cache.get(subject) is entry:
                self._cache[subject] = key
        return key

    def _entry(self, subject: UUID) -> _Entry:
        """The subject's cache entry, read from the table if not held (not remembered if
        nothing was ever sealed for it: None then too)."""
        known, entry = self._cached(subject)
        if known:
            return entry
        self.load([subject])
        return self._cached(subject)[1]

    def _key(self, subject: UUID, create: bool) -> AESGCM | None:
        """The subject's data key; None if erased, or unknown and not `create`."""
        known, entry = self._cached(subject)
        if known:
            return self._usable(subject, entry)
        if not create:
            return self._usable(subject, self._entry(subject))
        with self._db().connection() as conn:
            raw = AESGCM.generate_key(256)
            made = conn.execute(
                "INSERT INTO subject_keys (subject_id, wrapped) VALUES (%s, %s)"
                " ON CONFLICT (subject_id) DO NOTHING RETURNING subject_id",
                [subject, self._wrap(subject, raw)],
            ).fetchone()
            if made is not None:
                key = AESGCM(raw)
                self._remember(subject, key)
                return key
            # Another writer made it first, or it is erased.
            row = conn.execute(
                "SELECT wrapped FROM subject_keys WHERE subject_id = %s", [subject]
            ).fetchone()
        if row is None:
            return None  # nothing was ever sealed for it; not remembered
        found = None if row[0] is None else self._unwrap(subject, bytes(row[0]))
        self._remember(subject, found)
        return found

    def mint(self, subjects: Iterable[UUID]) -> list[tuple[UUID, bytes]]:
        """New data keys for new subjects (patients being registered), held in memory at
        once: (subject, wrapped key) rows that the caller stores in the same transaction
        as the first sealed values, or `forget`s if that transaction fails."""
        new = [subject for subject in dict.fromkeys(subjects) if not self._cached(subject)[0]]
        # One draw of random bytes (a system call: see _Nonces) for the batch's keys.
        keys = os.urandom(_KEY * len(new)) if new else b""
        rows = []
        for i, subject in enumerate(new):
            key = keys[i * _KEY : (i + 1) * _KEY]
            self._remember(subject, AESGCM(key))
            rows.append((subject, self._wrap(subject, key)))
        return rows

    def erased(self, subject: UUID) -> bool:
        """Whether the subject's key has been destroyed."""
        known, key = self._cached(subject)
        if known:
            return key is None
        with self._db().connection() as conn:
            row = conn.execute(
                "SELECT wrapped IS NULL FROM subject_keys WHERE subject_id = %s", [subject]
            ).fetchone()
        return bool(row and row[0])

    def destroy(self, subject: UUID) -> None:
        """Erases the subject: deletes its data key for good and tells every process."""
        with self._db().connection() as conn, conn.transaction():
            conn.execute(
                "INSERT INTO subject_keys (subject_id, wrapped, erased_at) VALUES (%s, NULL, now())"
                " ON CONFLICT (subject_id) DO UPDATE SET wrapped = NULL,"
                " erased_at = coalesce(subject_keys.erased_at, now())",
                [subject],
            )
            conn.execute("SELECT pg_notify(%s, %s)", [CHANNEL, str(subject)])
        self._remember(subject, None)

    # --- values -----------------------------------------------------------------------

    def seal(self, subject: UUID, field: str, value: object) -> str:
        """The value sealed for the subject; SubjectErased if the subject is erased."""
        key = self._key(subject, create=True)
        if key is None:
            raise SubjectErased(subject)
        nonce = self._nonces.take(1)
        sealed = key.encrypt(nonce, as_text(value).encode(), _aad(subject, field))
        return f"{SEALED_PREFIX}{subject}:{base64.b64encode(nonce + sealed).decode()}"

    def open(self, token: str, field: str) -> str | None:
        """The sealed value in the clear; None if its subject is erased. A value that is
        not sealed (stored before sealing began) is returned as it is."""
        if not is_sealed(token):
            return token
        subject, body = _split(token)
        key = self._key(subject, create=False)
        if key is None:
            return None
        return _decrypt(key, subject, field, _raw(body))

    def seal_fields(self, personal: Personal, subject: UUID, state: dict[str, Any]) -> None:
        """Seals `personal`'s fields of `state` in place (values already sealed stay)."""
        fields = [
            f for f in personal.fields if state.get(f) is not None and not is_sealed(state[f])
        ]
        if not fields:
            return
        key = self._key(subject, create=True)
        if key is None:
            raise SubjectErased(subject)
        prefix, aad = f"{SEALED_PREFIX}{subject}:", subject.bytes
        nonces = self._nonces.take(len(fields))
        for i, field in enumerate(fields):
            nonce = nonces[i * _NONCE : (i + 1) * _NONCE]
            sealed = key.encrypt(nonce, as_text(state[field]).encode(), aad + field.encode())
            state[field] = prefix + base64.b64encode(nonce + sealed).decode()

    def open_fields(
        self, personal: Personal, state: dict[str, Any], only: Collection[str] | None = None
    ) -> bool:
        """Opens `personal`'s fields of `state` in place; False if the subject is erased
        (its fields are then None). With `only`, the other sealed fields stay sealed: a
        reader that uses few fields decrypts only those (a reader of none unwraps no key),
        and still learns of an erasure."""
        subjects: dict[str, tuple[UUID, _Entry]] = {}
        opened: list[tuple[str, str, str]] = []
        for field in personal.fields:
            value = state.get(field)
            if not isinstance(value, str):
                continue
            if not value.startswith(SEALED_PREFIX):
                state[field] = in_clear(value, field in personal.dates)
                continue
            # A record's fields share their subject: its id is parsed and looked up once.
            subject_text, _, body = value[len(SEALED_PREFIX) :].partition(":")
            if subject_text not in subjects:
                subject = _subject(subject_text)
                subjects[subject_text] = (subject, self._entry(subject))
            if only is None or field in only:
                opened.append((field, subject_text, body))
        if any(entry is None for _, entry in subjects.values()):
            for field in personal.fields:
                if is_sealed(state.get(field)):
                    state[field] = None
            return False
        keys: dict[str, AESGCM | None] = {}
        for field, subject_text, body in opened:
            subject, entry = subjects[subject_text]
            if subject_text not in keys:
                keys[subject_text] = self._usable(subject, entry)  # unwrapped once
            key = keys[subject_text]
            assert key is not None
            text = _decrypt(key, subject, field, _raw(body))
            state[field] = in_clear(text, field in personal.dates)
        return True

    def load(self, subjects: Iterable[UUID]) -> None:
        """Reads the data keys of the subjects not held in memory, in one round trip: a
        batch of events about new patients would otherwise cost a query each. They stay
        wrapped until used."""
        with self._lock:
            missing = [s for s in dict.fromkeys(subjects) if s not in self._cache]
        if not missing:
            return
        with self._db().connection() as conn:
            rows = conn.execute(
                "SELECT subject_id, wrapped FROM subject_keys WHERE subject_id = ANY(%s)",
                [missing],
            ).fetchall()
        for subject, wrapped in rows:
            self._remember(subject, None if wrapped is None else bytes(wrapped))

    # --- erasures elsewhere -----------------------------------------------------------

    def listen(self) -> None:
        """Follows erasures announced by other processes (a daemon thread)."""
        if self._listener is None:
            self._listener = threading.Thread(target=self._follow, name="keyring", daemon=True)
            self._listener.start()

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._database_url, autocommit=True) as conn:
                    conn.execute(f'LISTEN "{CHANNEL}"')
                    # Erasures announced while no one listened: drop every key once.
                    with self._lock:
                        self._cache.clear()
                    while not self._stop.is_set():
                        for notice in conn.notifies(timeout=1.0):
                            try:
                                self.forget(UUID(notice.payload))
                            except ValueError:
                                continue
            except psycopg.Error as exc:
                log.warning("keyring: not following erasures; retrying", error=type(exc).__name__)
                self._stop.wait(1.0)

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=3)
            self._listener = None
        if self._pool is not None:
            self._pool.close()
            self._pool = None


def open_payload(keyring: Keyring | None, data: Any, only: Collection[str] | None = None) -> Any:
    """A published payload in the clear: a sealed version (contracts.SEALED) opens to the
    clear version before it, or to `contracts.Unreadable` if its patient is erased. Other
    payloads are returned as they are. Without a keyring only values that were never
    sealed (a store that does not seal) can be opened; UnreadableToken otherwise.

    With `only`, personal fields not named stay sealed (strings) in the clear version:
    for a reader that never uses them."""
    entry = contracts.SEALED.get(type(data))
    if entry is None:
        return data
    clear, personal = entry
    values = msgspec.structs.asdict(data)
    if keyring is None:
        if any(is_sealed(values.get(field)) for field in personal.fields):
            raise UnreadableToken("a sealed value, and no keyring to open it")
        for field in personal.dates:
            if isinstance(values.get(field), str):
                values[field] = in_clear(values[field], True)
    elif not keyring.open_fields(personal, values, only):
        return contracts.Unreadable(sealed=data)
    return clear(**{field: values[field] for field in clear.__struct_fields__})


def open_payloads(
    keyring: Keyring | None, payloads: Iterable[Any], only: Collection[str] | None = None
) -> list[Any]:
    """`open_payload` of each, their subjects' keys read first in one round trip."""
    payloads = list(payloads)
    if keyring is not None:
        keyring.load(s for s in map(_subject_of_payload, payloads) if s is not None)
    return [open_payload(keyring, data, only) for data in payloads]


def _subject_of_payload(data: Any) -> UUID | None:
    entry = contracts.SEALED.get(type(data))
    if entry is None:
        return None
    for field in entry[1].fields:
        subject = subject_of_token(getattr(data, field))
        if subject is not None:
            return subject
    return None


def _split(token: str) -> tuple[UUID, str]:
    """A sealed value's subject and its base64 body; UnreadableToken if damaged."""
    subject_text, _, body = token[len(SEALED_PREFIX) :].partition(":")
    return _subject(subject_text), body


def _subject(text: str) -> UUID:
    try:
        return UUID(text)
    except ValueError:
        raise UnreadableToken("a sealed value is damaged") from None


def _raw(body: str) -> bytes:
    """A sealed value's nonce and ciphertext, from its base64 body."""
    try:
        return base64.b64decode(body, validate=True)
    except (ValueError, binascii.Error):
        raise UnreadableToken("a sealed value is damaged") from None


def _decrypt(key: AESGCM, subject: UUID, field: str, raw: bytes) -> str:
    """A sealed field's text (`raw`: nonce and ciphertext, as `_raw` gives it)."""
    try:
        return key.decrypt(raw[:_NONCE], raw[_NONCE:], _aad(subject, field)).decode()
    except InvalidTag:
        raise UnreadableToken("a sealed value does not open with its subject's key") from None


def _aad(subject: UUID, field: str) -> bytes:
    return subject.bytes + field.encode()
