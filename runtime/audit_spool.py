"""The disclosure audit's spool: each record is appended to a file of its process before
the answer that shows the data goes out, and shipped from there into `audit.disclosures`
within milliseconds.

Why a spool: a record written to PostgreSQL before each answer costs every read a round
trip to another process and a wait for the disk, about as long again as an unaudited
answer takes. An append to a file this process holds open costs a few microseconds, and
the kernel keeps it whatever happens to the process (a crash, SIGKILL, an OOM kill).

The guarantees (docs/auth.md, "Disclosure audit"):
- A read is answered only once its record is appended to the spool. An append that fails
  (a full or broken disk) refuses the read with 503.
- While the audit's table does not take the spool's records (the database unreachable,
  a failed INSERT), or takes them more than `max_delay` seconds late, reads are refused
  with 503: what is spooled is bounded by the store being there.
- Every record spooled is stored once. A segment's records and how far it has been
  shipped (`audit.spool_marks`) are written in one statement, so a shipment that fails,
  or whose answer is lost, is sent again from the mark and never twice.
- A segment whose process died is shipped by another writer of the same database on the
  same host: every `adopt_every` seconds, at startup, and when `GET /audit` asks.
- Only a power loss or a kernel crash within the milliseconds between an append and its
  shipment loses records.

Segments: `<store>.<host>.<pid>.<random>.spool` in the spool directory, one per writer,
held under an exclusive `flock` for the writer's life (the kernel lets go when the process
dies, which is how another writer knows it may adopt the file). `<store>` names the
database (a digest of its host, port and name), so writers of different databases can
share a directory. One JSON line per record; the ids of a list of patients travel once per
segment, after which its lines carry the list's digest (migration 0017).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import socket
import time
import uuid
from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import psycopg_pool
import structlog
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import Json

from runtime.audit import (
    KNOWN_SETS,
    SHIP_LINES,
    AuditUnavailable,
    Disclosure,
    Line,
    check_autocommit,
    digest_of,
    line_of,
)
from runtime.settings import SettingsError

log = structlog.get_logger(__name__)

SUFFIX = ".spool"
CHUNK = 1 << 20
"""Most bytes of a segment one shipment reads (about 4,000 records)."""


_encode = msgspec.json.Encoder().encode
_check = msgspec.json.Decoder(Line).decode


def store_name(database_url: str) -> str:
    """The database a segment's records belong to: a digest of its host, port and name."""
    info = conninfo_to_dict(database_url)
    where = f"{info.get('host', '')}:{info.get('port', '')}/{info.get('dbname', '')}"
    return hashlib.sha256(where.encode()).hexdigest()[:12]


class Segment:
    """A spool file this process holds the lock of: its own (appended to) or one adopted
    from a process that died (shipped, then removed)."""

    def __init__(self, path: Path, fd: int, clean: bool = False):
        self.path = path
        self.fd = fd
        self.shipped: int | None = None
        """How far it is stored (from `audit.spool_marks`); None: read the mark first."""
        self.clean = clean
        """Every line is known whole: this process's own segment, no append cut short."""

    @classmethod
    def create(cls, directory: Path, store: str) -> Segment:
        """A new segment of this process, locked before it appears under its name (so no
        other writer can take it for a dead one's)."""
        name = f"{store}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        forming = directory / f".{name}.new"
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(forming, flags, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path = directory / f"{name}{SUFFIX}"
        os.rename(forming, path)
        return cls(path, fd, clean=True)

    @classmethod
    def adopt(cls, path: Path) -> Segment | None:
        """The segment at `path` if its writer is gone (its lock is free) and no one has
        shipped and removed it meanwhile; else None."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_nlink == 0:  # shipped and removed by another adopter
                raise BlockingIOError
        except BlockingIOError:
            os.close(fd)
            return None
        return cls(path, fd)

    @property
    def name(self) -> str:
        return self.path.name

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)  # lets go of the lock


class Appender:
    """Appends records to a segment of this process, each list of patients' ids once."""

    def __init__(self, segment: Segment):
        self.segment = segment
        self._sets: OrderedDict[str, None] = OrderedDict()
        self._torn = False

    def append(self, disclosure: Disclosure) -> None:
        """One line, in one write; AuditUnavailable if the write fails."""
        digest = digest_of(disclosure.patient_ids).hex()
        first = digest not in self._sets
        data = _encode(line_of(disclosure, digest, with_ids=first)) + b"\n"
        if self._torn:
            data = b"\n" + data  # after a torn append: that part is a line of its own
        try:
            if os.write(self.segment.fd, data) != len(data):
                raise OSError("short write to the audit spool")
        except OSError as exc:
            self._torn = True
            self.segment.clean = False
            log.error("disclosure audit not written", error=type(exc).__name__)
            raise AuditUnavailable(type(exc).__name__) from None
        self._torn = False
        if first:
            self._sets[digest] = None
            if len(self._sets) > KNOWN_SETS:
                self._sets.popitem(last=False)
        else:
            self._sets.move_to_end(digest)


class SpooledWriter:
    """The query API's disclosure audit writer (`runtime.audit.Writer`): appends each
    record to this process's segment, and ships segments to PostgreSQL through `pool`
    (autocommit) at most every `every` seconds, in the background."""

    def __init__(
        self,
        pool: psycopg_pool.AsyncConnectionPool[Any],
        directory: Path,
        database_url: str,
        *,
        every: float = 0.01,
        max_delay: float = 5.0,
        adopt_every: float = 30.0,
        rotate_bytes: int = 64 << 20,
    ):
        check_autocommit(pool)
        self.pool = pool
        self.directory = directory
        self.store = store_name(database_url)
        self.every = every
        self.max_delay = max_delay
        self.adopt_every = adopt_every
        self.rotate_bytes = rotate_bytes
        self._appender: Appender | None = None
        self._appended = 0
        self._behind_since: float | None = None
        self._failing = False
        self._wake = asyncio.Event()
        self._adopt_now = asyncio.Event()
        self._hurry = asyncio.Event()
        self._shipper: asyncio.Task[None] | None = None
        self._adopter: asyncio.Task[None] | None = None
        self._removals: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> None:
        """Opens this process's segment; SettingsError if the directory will not hold one."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._appender = Appender(Segment.create(self.directory, self.store))
        except OSError as exc:
            raise SettingsError(
                f"CARELOG_AUDIT_SPOOL_DIR={str(self.directory)!r}: no spool file can be"
                f" made there ({exc.strerror or type(exc).__name__})"
            ) from None
        self._shipper = asyncio.create_task(self._ship_forever(), name="audit-spool-ship")
        self._adopter = asyncio.create_task(self._adopt_forever(), name="audit-spool-adopt")

    async def record(self, disclosure: Disclosure) -> None:
        self.append(disclosure)

    def append(self, disclosure: Disclosure) -> None:
        """Appends the record to this process's segment; AuditUnavailable if it cannot be
        appended, or if the table is not taking the spool's records."""
        if self._appender is None or self._closing:
            raise AuditUnavailable("the audit spool is not open")
        if self._failing:
            raise AuditUnavailable("the audit's table is not taking records")
        now = time.monotonic()
        if self._behind_since is not None and now - self._behind_since > self.max_delay:
            raise AuditUnavailable("the audit's table is taking records too late")
        self._appender.append(disclosure)
        self._appended += 1
        if self._behind_since is None:
            self._behind_since = now
        self._wake.set()

    @property
    def _own(self) -> Segment | None:
        return None if self._appender is None else self._appender.segment

    # --- Shipping ------------------------------------------------------------------------

    async def _ship_forever(self) -> None:
        delay = self.every
        while True:
            await self._wake.wait()
            self._wake.clear()
            started, appended = time.monotonic(), self._appended
            try:
                await self._ship_own()
            except Exception as exc:  # the database, the disk, or a fault of ours: refuse
                if not self._failing:
                    log.error("disclosure audit not shipped", error=type(exc).__name__)
                self._failing = True
                delay = min(max(delay * 2, 0.05), 1.0)
                self._wake.set()
            else:
                if self._failing:
                    log.info("disclosure audit shipping again")
                self._failing = False
                self._behind_since = None if self._appended == appended else started
                delay = self.every
            if self._closing:
                return
            with contextlib.suppress(TimeoutError):  # paced, unless GET /audit is waiting
                await asyncio.wait_for(
                    self._hurry.wait(), max(0.0, started + delay - time.monotonic())
                )
            self._hurry.clear()

    async def _ship_own(self) -> None:
        """Ships this process's segment; tried twice, so a connection the server ended
        while it rested in the pool costs another, not a refused read."""
        own = self._own
        assert own is not None
        try:
            try:
                await self._ship_all(own)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                own.shipped = None  # whether it landed is unknown: the mark says
                await self._ship_all(own)
        except BaseException:
            own.shipped = None
            raise
        self._rotate(own)

    async def _ship_all(self, segment: Segment) -> None:
        """Ships `segment` up to its end as it is now, a chunk per statement."""
        while await self._ship(segment) == CHUNK:
            pass

    async def _ship(self, segment: Segment) -> int:
        """Ships the complete lines after the segment's mark (at most a chunk); the
        number of bytes read."""
        async with self.pool.connection() as conn:
            if segment.shipped is None:
                segment.shipped = await _mark(conn, segment.name)
            data = os.pread(segment.fd, CHUNK, segment.shipped)
            end = data.rfind(b"\n") + 1
            if end == 0:
                return len(data)
            body = data[: end - 1]
            # Each line of a clean segment is one whole append: the array is the lines,
            # comma-joined.
            lines = body.replace(b"\n", b",") if segment.clean else _whole_lines(body, segment.name)
            await conn.execute(
                SHIP_LINES,
                {
                    "lines": Json(b"[" + lines + b"]", dumps=_as_is),
                    "segment": segment.name,
                    "shipped": segment.shipped + end,
                },
            )
        segment.shipped += end
        return len(data)

    def _rotate(self, own: Segment) -> None:
        """Starts a new segment once this one is large and wholly shipped, and removes
        it. (No await between the check and the swap: nothing is appended meanwhile.)"""
        if own.shipped is None or own.shipped < self.rotate_bytes or own.size() != own.shipped:
            return
        self._appender = Appender(Segment.create(self.directory, self.store))
        removal = asyncio.create_task(self._remove(own))
        self._removals.add(removal)
        removal.add_done_callback(self._removals.discard)

    async def _remove(self, segment: Segment) -> None:
        """Removes a wholly shipped segment: the file first, then its mark (a mark without
        a file is harmless; a file without its mark would be shipped again)."""
        try:
            segment.path.unlink(missing_ok=True)
            async with self.pool.connection() as conn:
                await conn.execute(
                    "DELETE FROM audit.spool_marks WHERE segment = %s", [segment.name]
                )
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            log.warning("audit spool mark not removed", error=type(exc).__name__)
        finally:
            segment.close()

    # --- Segments of processes that died -------------------------------------------------

    async def _adopt_forever(self) -> None:
        while not self._closing:
            try:
                await self.adopt()
            except Exception as exc:  # tried again at the next round
                log.warning("audit spool segments not adopted", error=type(exc).__name__)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._adopt_now.wait(), self.adopt_every)
            self._adopt_now.clear()

    def segments(self) -> list[Path]:
        """This database's segments in the spool directory, this process's among them."""
        return segment_paths(self.directory, self.store)

    async def adopt(self) -> int:
        """Ships and removes every segment whose writer is gone; how many."""
        adopted = 0
        for path in self.segments():
            if self._own is not None and path == self._own.path:
                continue
            segment = Segment.adopt(path)
            if segment is None:
                continue
            try:
                await self._ship_all(segment)
            except BaseException:
                segment.close()
                raise
            log.info("audit spool segment adopted", segment=segment.name)
            await self._remove(segment)
            adopted += 1
        return adopted

    # --- Waiting for the table -----------------------------------------------------------

    async def flush(self, timeout: float = 2.0) -> bool:
        """Waits until every record spooled so far for this database on this host (by
        this process and the others sharing the directory) is in the table, or
        `timeout`; whether it is. `GET /audit` asks first, so it shows what was read."""
        sizes = spooled(self.directory, self.store)
        deadline = time.monotonic() + timeout
        self._adopt_now.set()
        while sizes:
            self._wake.set()
            self._hurry.set()
            async with self.pool.connection() as conn:
                cursor = await conn.execute(MARKS, [list(sizes)])
                sizes = unshipped(self.directory, sizes, dict(await cursor.fetchall()))
            if sizes and time.monotonic() > deadline:
                log.warning("audit spool not yet shipped", segments=len(sizes))
                return False
            if sizes:
                await asyncio.sleep(0.005)
        return True

    async def close(self, timeout: float = 5.0) -> None:
        """Ships what is spooled (for up to `timeout`), removes this process's segment if
        it is all stored, and stops; a segment left behind is adopted later."""
        if self._own is None or self._closing:
            return
        self._closing = True
        self._adopt_now.set()
        own = self._own
        assert self._shipper is not None and self._adopter is not None
        self._adopter.cancel()
        self._wake.set()
        self._hurry.set()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.wait_for(self._shipper, timeout)
        try:
            await asyncio.wait_for(self._ship_all(own), timeout)
        except (psycopg.Error, psycopg_pool.PoolTimeout, OSError, TimeoutError) as exc:
            log.error("audit spool left for adoption", error=type(exc).__name__)
            own.close()
        else:
            await self._remove(own)
        tasks = [self._shipper, self._adopter, *self._removals]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


MARKS = "SELECT segment, shipped FROM audit.spool_marks WHERE segment = ANY(%s)"
"""How far each of the named segments (a list) is stored."""


def segment_paths(directory: Path, store: str) -> list[Path]:
    """The store's segments in `directory`, by name."""
    return sorted(directory.glob(f"{store}.*{SUFFIX}"))


def spooled(directory: Path, store: str) -> dict[str, int]:
    """The size of each of the store's segments in `directory` that holds anything."""
    sizes = {}
    for path in segment_paths(directory, store):
        with contextlib.suppress(FileNotFoundError):
            sizes[path.name] = path.stat().st_size
    return {name: size for name, size in sizes.items() if size > 0}


def unshipped(directory: Path, sizes: dict[str, int], marks: dict[str, int]) -> dict[str, int]:
    """Of the segments of `sizes`, those not yet stored up to that size by their `marks`
    (and still there: a segment shipped whole is removed)."""
    return {
        name: size
        for name, size in sizes.items()
        if marks.get(name, 0) < size and (directory / name).exists()
    }


def _as_is(data: bytes) -> bytes:
    return data


def _whole_lines(body: bytes, segment: str) -> bytes:
    """The lines of `body` that are whole records, comma-joined: a segment whose appends
    may have been cut short (a full disk) is read line by line."""
    lines = []
    for raw in body.split(b"\n"):
        try:
            _check(raw)
        except msgspec.DecodeError:
            log.warning("torn audit spool line skipped", segment=segment)
            continue  # the start of an append that failed: its read was refused
        lines.append(raw)
    return b",".join(lines)


async def _mark(conn: psycopg.AsyncConnection[Any], segment: str) -> int:
    cursor = await conn.execute(
        "SELECT shipped FROM audit.spool_marks WHERE segment = %s", [segment]
    )
    row = await cursor.fetchone()
    return 0 if row is None else int(row[0])
