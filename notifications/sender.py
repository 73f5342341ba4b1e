"""The notifier's sender: delivers what the ledger owes, over SMTP, at most once each.

A due row is claimed (`sending`, attempt counted) and that is committed before the
SMTP transaction starts; the outcome is recorded after it. So a crash between the
server accepting a message and the ledger recording it leaves the row `sending`,
and the next sender to start gives it up as "in doubt" rather than send it again
(visibly: given-up, with a metric). Rows are claimed in batches (20) and a batch's
outcomes are recorded together, in one statement, once its last message is done:
a crash gives up at most the batch in flight, which it would anyway (what was
claimed and not yet tried is in doubt too), and a message costs no round trip of
its own to the database. Temporary failures (4xx replies, a server that does not
answer) retry with exponential backoff and jitter; permanent ones (5xx replies, a
refused address, a removed patient) are given up with their reason. Only one
sender runs at a time (an advisory lock).

A message carries a `Message-ID` derived from its ledger key and only what the
patient needs: no diagnosis, no reason for the visit. After sending, the ledger
keeps ids, purpose and state; the address and the text are never stored.

The claimed batch's directory records are read in one query with the claim, and no
transaction stays open across the SMTP exchanges.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import aiosmtplib
import jinja2
import psycopg
import structlog
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    MAX_RESPONSE_LENGTH,
    PERIOD_REGEX,
    SMTPProtocol,
    normalize_message_line_endings,
)
from aiosmtplib.response import SMTPResponse
from aiosmtplib.typing import SMTPStatus
from prometheus_client import Counter
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool
from tenacity import RetryCallState, wait_exponential_jitter

from notifications.config import NotifierConfig
from notifications.intake import REMINDER, about, plan
from notifications.mail import Headers, Mail, compose
from readmodels import appointments as schedule
from readmodels.directory import DirectoryRecord, get_records

log = structlog.get_logger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
SUBJECTS = {
    "welcome": "Welcome to {practice}",
    "booking-confirmation": "Your appointment is booked",
    "reschedule-notice": "Your appointment has moved",
    "cancellation-notice": "Your appointment is cancelled",
    "reminder": "Your appointment tomorrow",
}

SENT = Counter(
    "carelog_notifications_total", "Notifications by purpose and outcome", ["purpose", "outcome"]
)
GIVEN_UP = Counter(
    "carelog_notifications_given_up_total", "Notifications given up, by reason", ["reason"]
)

_LOCK = "carelog.notifier.sender"


class Permanent(Exception):
    """No retry can deliver this one (a 5xx reply, a refused or missing address)."""


class NotYet(Exception):
    """Something the message needs is not known yet (the directory lags); retry later."""


@dataclass(frozen=True)
class Due:
    id: UUID
    patient_id: UUID
    purpose: str
    source: str
    attempts: int
    details: dict[str, Any] | None


@dataclass(frozen=True)
class Outcome:
    """What became of one claimed message, to be recorded with the rest of its batch."""

    item: Due
    status: str
    error: str | None
    retry_in: float = 0.0
    given_up: str | None = None
    """Why, for the given-up metric."""


class Sender:
    def __init__(self, pool: AsyncConnectionPool[Any], config: NotifierConfig, timezone: str):
        self.pool = pool
        self.config = config
        self.zone = ZoneInfo(timezone)
        templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            autoescape=jinja2.select_autoescape(["html.j2"]),
            undefined=jinja2.StrictUndefined,
        )
        self.templates = {
            purpose: (
                templates.get_template(f"{purpose}.txt.j2"),
                templates.get_template(f"{purpose}.html.j2"),
            )
            for purpose in SUBJECTS
        }
        self.headers = Headers.of(
            config.mail_from,
            {p: s.format(practice=config.practice_name) for p, s in SUBJECTS.items()},
        )
        self._wait = wait_exponential_jitter(
            initial=config.first_retry_seconds, max=config.max_retry_seconds
        )
        self._leader: psycopg.AsyncConnection[Any] | None = None
        self._smtp: aiosmtplib.SMTP | None = None

    async def lead(self, dsn: str) -> None:
        """Waits to be the only sender, then gives up what a crashed one left in doubt."""
        self._leader = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        while True:
            row = await (
                await self._leader.execute("SELECT pg_try_advisory_lock(hashtext(%s))", [_LOCK])
            ).fetchone()
            if row and row[0]:
                break
            await asyncio.sleep(1.0)
        cur = await self._leader.execute(
            "UPDATE notifications SET status = 'given-up', updated_at = now(), details = NULL,"
            " last_error = 'in doubt: the sender stopped during sending; not sent again'"
            " WHERE status = 'sending' RETURNING purpose"
        )
        for (purpose,) in await cur.fetchall():
            GIVEN_UP.labels("in-doubt").inc()
            SENT.labels(purpose, "given-up").inc()

    async def close(self) -> None:
        if self._leader is not None:
            await self._leader.close()

    async def run(self, stop: asyncio.Event, pause: float = 0.05) -> None:
        try:
            while not stop.is_set():
                try:
                    sent = await self.send_due(keep_session=True)
                except (psycopg.OperationalError, OSError) as exc:
                    log.warning("sender paused", error=type(exc).__name__)
                    sent = 0
                if not sent:
                    await self._hang_up()  # idle: no session left open for a server to drop
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), pause)
        finally:
            await self._hang_up()

    async def send_due(self, limit: int = 20, keep_session: bool = False) -> int:
        """Claims and sends what is due; returns how many it tried.

        `keep_session`: a batch whose every message went out leaves its SMTP session open
        for the next batch (the run loop's, while there is work: a session per batch cost
        the notifier and the server a connection, a greeting and a goodbye per 20
        messages); a batch with any other outcome hangs up, so the next starts afresh."""
        async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            async with conn.transaction():
                await cur.execute(
                    "SELECT id, patient_id, purpose, source, attempts, details FROM notifications"
                    " WHERE status IN ('pending', 'failed-retrying') AND next_attempt_at <= now()"
                    " ORDER BY next_attempt_at, id LIMIT %s FOR UPDATE SKIP LOCKED",
                    [limit],
                )
                due = [Due(**row) for row in await cur.fetchall()]
                if not due:
                    return 0
                await cur.execute(
                    "UPDATE notifications SET status = 'sending', attempts = attempts + 1,"
                    " updated_at = now() WHERE id = ANY(%s)",
                    [[d.id for d in due]],
                )
                records = await get_records(conn, [d.patient_id for d in due])
            await conn.set_autocommit(True)
            done: list[Outcome] = []
            try:
                for item in due:
                    done.append(await self._one(conn, item, records.get(item.patient_id)))
            finally:
                clean = len(done) == len(due) and all(o.status == "sent" for o in done)
                if not (keep_session and clean):
                    await self._hang_up()
                try:
                    if done:  # even if the batch stopped short: what went out is recorded
                        await self._record(conn, done)
                finally:
                    if not conn.closed:
                        await conn.set_autocommit(False)
        return len(due)

    async def _one(
        self, conn: psycopg.AsyncConnection[Any], item: Due, record: DirectoryRecord | None
    ) -> Outcome:
        attempt = item.attempts + 1
        try:
            await self._deliver(await self._compose(conn, item, record))
        except Permanent as exc:
            return Outcome(item, "given-up", str(exc), given_up=str(exc).split(":", 1)[0])
        except NotYet as exc:
            # A read model a moment behind: look again soon; only a long wait gives up.
            if attempt >= self.config.max_attempts * 20:
                error = f"gave up after {attempt}: {exc}"
                return Outcome(item, "given-up", error, given_up="attempts")
            return Outcome(item, "failed-retrying", str(exc), retry_in=min(0.1 * attempt, 5.0))
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            reason = f"temporary: {type(exc).__name__}"
            if attempt >= self.config.max_attempts:
                error = f"gave up after {attempt}: {reason}"
                return Outcome(item, "given-up", error, given_up="attempts")
            return Outcome(item, "failed-retrying", reason, retry_in=self._wait(_Attempt(attempt)))
        return Outcome(item, "sent", None)

    async def _record(self, conn: psycopg.AsyncConnection[Any], done: list[Outcome]) -> None:
        await conn.execute(
            "UPDATE notifications n SET status = o.status, last_error = o.error,"
            " updated_at = now(), next_attempt_at = now() + make_interval(secs => o.retry_in),"
            " sent_at = CASE WHEN o.status = 'sent' THEN now() END,"
            " details = CASE WHEN o.status IN ('sent', 'given-up') THEN NULL ELSE n.details END"
            " FROM unnest(%s::uuid[], %s::text[], %s::text[], %s::float8[])"
            " AS o(id, status, error, retry_in) WHERE n.id = o.id",
            [
                [o.item.id for o in done],
                [o.status for o in done],
                [o.error for o in done],
                [o.retry_in for o in done],
            ],
        )
        for o in done:
            SENT.labels(o.item.purpose, o.status).inc()
            if o.given_up:
                GIVEN_UP.labels(o.given_up).inc()
            log.info(
                "notification " + o.status,
                notification_id=str(o.item.id),
                purpose=o.item.purpose,
                patient_id=str(o.item.patient_id),
                error=o.error,
            )

    async def _compose(
        self, conn: psycopg.AsyncConnection[Any], item: Due, record: DirectoryRecord | None
    ) -> Mail:
        if record is None:
            raise NotYet("waiting: the directory does not know the patient yet")
        if record.removed:
            raise Permanent("patient removed")
        if "@" not in record.email:
            raise Permanent("bad address")
        context: dict[str, Any] = {"name": record.name, "practice": self.config.practice_name}
        details = item.details or {}
        if details.get("appointmentId"):
            appointment = await schedule.get_appointment(conn, UUID(details["appointmentId"]))
            if item.purpose == REMINDER and (
                appointment is None
                or appointment.status not in ("booked", "checked-in")
                or appointment.start.astimezone(UTC).isoformat() != details.get("start")
            ):
                raise Permanent("no longer due: the appointment moved or was cancelled")
            start = datetime.fromisoformat(details["start"]) if details.get("start") else None
            clinician_id = details.get("clinicianId")
            if appointment is not None:
                start = start or appointment.start
                clinician_id = clinician_id or str(appointment.clinician_id)
            if start is None or clinician_id is None:
                raise NotYet("waiting: the appointments model does not know the appointment yet")
            clinician = await schedule.get_clinician(conn, UUID(clinician_id))
            if clinician is None:
                raise NotYet("waiting: the appointments model does not know the clinician yet")
            context |= {
                "clinician": clinician.name,
                "when": start.astimezone(self.zone).strftime("%A %d %B %Y at %H:%M"),
            }
        text, html = self.templates[item.purpose]
        try:
            return compose(
                self.headers,
                recipient=record.email,
                message_id=item.id,
                purpose=item.purpose,
                text=text.render(context),
                html=html.render(context),
            )
        except ValueError:  # a line break in the address
            raise Permanent("bad address") from None

    async def _session(self) -> aiosmtplib.SMTP:
        """One SMTP session for a batch of messages (connected, TLS, logged in, and the
        server's extensions known)."""
        if self._smtp is None or not self._smtp.is_connected:
            client = aiosmtplib.SMTP(
                hostname=self.config.smtp_host,
                port=self.config.smtp_port,
                start_tls=self.config.smtp_starttls,
                timeout=10,
            )
            await client.connect()
            if self.config.smtp_username:
                await client.login(self.config.smtp_username, self.config.smtp_password or "")
            self._smtp = client
        if self._smtp.is_ehlo_or_helo_needed:  # as `sendmail` would: EHLO, else HELO
            try:
                await self._smtp.ehlo()
            except aiosmtplib.SMTPHeloError:
                await self._smtp.helo()
        return self._smtp

    async def _hang_up(self) -> None:
        client, self._smtp = self._smtp, None
        if client is not None and client.is_connected:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await client.quit()

    async def _deliver(self, mail: Mail) -> None:
        try:
            client = await self._session()
            if client.supports_extension("pipelining"):
                await _pipelined(client, mail)
            else:
                await client.sendmail(
                    mail.mail_from, [mail.recipient], mail.data, mail_options=mail.options
                )
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPConnectError, OSError):
            self._smtp = None  # reconnect for the next message
            raise
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            if all(code >= 500 for code in codes):
                raise Permanent(f"address refused: {codes[0]}") from None
            raise
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code >= 500:
                raise Permanent(f"smtp {exc.code}") from None
            raise


async def _pipelined(client: aiosmtplib.SMTP, mail: Mail) -> None:
    """One message's transaction with a server that pipelines (RFC 2920): MAIL, RCPT and
    DATA in one write and their three replies read in order, then the message and its
    reply; two round trips where `sendmail` takes four. Raises what `sendmail` raises.

    A refused MAIL or RCPT is answered as `sendmail` answers it, with RSET. Should the
    server still answer DATA with 354 (a compliant one refuses DATA when no recipient was
    accepted), no end of data is sent, as "." alone would deliver an empty message: the
    connection is closed instead, and the next message connects anew."""
    protocol = client.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Server not connected")
    options = list(mail.options)
    utf8 = any(option.upper() == "SMTPUTF8" for option in options)
    if utf8 and not client.supports_extension("smtputf8"):
        raise aiosmtplib.SMTPNotSupported("SMTPUTF8 is not supported by this server")
    message = normalize_message_line_endings(mail.data)
    if client.supports_extension("size"):
        options.insert(0, f"SIZE={len(message)}")
    encoding = "utf-8" if utf8 else "ascii"
    mail_command = b" ".join(
        [b"MAIL FROM:" + quote_address(mail.mail_from).encode(encoding)]
        + [option.encode("ascii") for option in options]
    )
    rcpt_command = b"RCPT TO:" + quote_address(mail.recipient).encode(encoding)
    for command in (mail_command, rcpt_command):
        if COMMAND_INJECTION_REGEX.search(command):
            raise ValueError("Command arg contains a prohibited control character")
    timeout = client.timeout
    try:
        sender, recipient, data = await _Replies.exchange(
            client, protocol, mail_command + b"\r\n" + rcpt_command + b"\r\nDATA\r\n", 3
        )
        if data.code == SMTPStatus.start_input and (
            sender.code != SMTPStatus.completed or recipient.code not in _ACCEPTED
        ):
            client.close()  # nothing ends this message: the server keeps no part of it
        if sender.code != SMTPStatus.completed:
            raise aiosmtplib.SMTPSenderRefused(sender.code, sender.message, mail.mail_from)
        if recipient.code not in _ACCEPTED:
            refused = aiosmtplib.SMTPRecipientRefused(
                recipient.code, recipient.message, mail.recipient
            )
            raise aiosmtplib.SMTPRecipientsRefused([refused])
        if data.code != SMTPStatus.start_input:
            raise aiosmtplib.SMTPDataError(data.code, data.message)
        protocol.write(PERIOD_REGEX.sub(b"..", message) + b".\r\n")
        try:
            sent = await protocol.read_response(timeout=timeout)
        except BaseException:  # a lost connection, a timeout, a stop: in no state to go on
            client.close()
            raise
        if sent.code != SMTPStatus.completed:
            raise aiosmtplib.SMTPDataError(sent.code, sent.message)
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
        if client.is_connected:  # as `sendmail` does: the envelope reset for the next
            with contextlib.suppress(ConnectionError, aiosmtplib.SMTPResponseException):
                await client.rset(timeout=timeout)
        raise


_ACCEPTED = (SMTPStatus.completed, SMTPStatus.will_forward)


class _Replies(asyncio.Protocol):
    """Reads the replies to a pipelined group of commands in place of aiosmtplib's
    protocol, which reads one reply per command written: of replies arriving together it
    parses the first only, and what arrives before it is asked for it drops.

    Installed on the transport for the group's write and its replies, then aiosmtplib's
    protocol again; losing the connection and flow control reach aiosmtplib's protocol as
    before (it closes the client); a timeout or a lost connection close the client and
    raise aiosmtplib's errors, as its own commands do."""

    def __init__(self, inner: SMTPProtocol, count: int) -> None:
        self.inner = inner
        self.count = count
        self.buffer = bytearray()
        self.replies: list[SMTPResponse] = []
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def exchange(
        cls, client: aiosmtplib.SMTP, inner: SMTPProtocol, commands: bytes, count: int
    ) -> list[SMTPResponse]:
        """Writes `commands` and returns their `count` replies."""
        transport = inner.transport
        if transport is None or transport.is_closing():
            raise aiosmtplib.SMTPServerDisconnected("Connection lost")
        reader = cls(inner, count)
        transport.set_protocol(reader)
        try:
            inner.write(commands)
            await asyncio.wait_for(reader.done, client.timeout)
        except TimeoutError as exc:
            client.close()
            raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from exc
        except BaseException:  # a lost connection, a bad reply, a stop: in no state to go on
            client.close()
            raise
        finally:
            if not transport.is_closing():
                transport.set_protocol(inner)
        if reader.buffer:  # more than was asked: the replies no longer match the commands
            client.close()
            raise aiosmtplib.SMTPResponseException(
                SMTPStatus.invalid_response, "Unexpected data after the replies"
            )
        if any(reply.code == SMTPStatus.domain_unavailable for reply in reader.replies):
            client.close()  # 421: the server is closing the connection (as aiosmtplib does)
        return reader.replies

    def data_received(self, data: bytes) -> None:
        self.buffer.extend(data)
        if self.done.done():
            return
        while len(self.replies) < self.count:
            try:
                reply = self._reply()
            except aiosmtplib.SMTPException as exc:
                self.done.set_exception(exc)
                return
            if reply is None:
                return
            self.replies.append(reply)
        self.done.set_result(None)

    def _reply(self) -> SMTPResponse | None:
        """The first whole reply in the buffer (taken out of it), None if there is none."""
        start = 0
        lines: list[bytes] = []
        while (end := self.buffer.find(b"\n", start)) >= 0:
            line = bytes(self.buffer[start : end + 1])
            start = end + 1
            code = line[:3]
            if not code.isdigit() or line[3:4] not in (b" ", b"-", b"\r", b"\n"):
                raise aiosmtplib.SMTPResponseException(
                    SMTPStatus.invalid_response, f"Malformed SMTP response line: {line!r}"
                )
            lines.append(line[4:].strip(b" \t\r\n"))
            if line[3:4] != b"-":
                del self.buffer[:start]
                return SMTPResponse(int(code), b"\n".join(lines).decode("utf-8", "surrogateescape"))
        if len(self.buffer) > MAX_RESPONSE_LENGTH:
            raise aiosmtplib.SMTPResponseException(SMTPStatus.invalid_response, "Response too long")
        return None

    def eof_received(self) -> bool:
        self._lost()
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()
        self.inner.connection_lost(exc)

    def _lost(self) -> None:
        if not self.done.done():
            self.done.set_exception(aiosmtplib.SMTPServerDisconnected("Connection lost"))

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class _Attempt(RetryCallState):
    """Just enough of tenacity's retry state for its wait strategies."""

    def __init__(self, number: int):
        self.attempt_number = number


async def plan_reminders(pool: AsyncConnectionPool[Any], hours: int) -> int:
    """Owes a reminder for each active appointment starting within `hours` (unless the
    patient opted out), keyed by its start, so a moved one is reminded anew; gives up
    the pending reminders of appointments that moved or were cancelled."""
    planned = 0
    async with pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
        await cur.execute(
            "SELECT a.id, a.patient_id, a.clinician_id, a.start_at FROM appointments a"
            " LEFT JOIN notification_preferences p ON p.patient_id = a.patient_id"
            " WHERE a.status IN ('booked', 'checked-in') AND a.start_at > now()"
            " AND a.start_at <= now() + make_interval(hours => %s) AND coalesce(p.reminders, true)",
            [hours],
        )
        for appointment, patient, clinician, start in await cur.fetchall():
            await plan(
                cur,
                reminder_source(appointment, start),
                REMINDER,
                patient,
                about(appointment, clinician, start),
            )
            planned += cur.rowcount
        await cur.execute(
            "SELECT n.id, n.source FROM notifications n WHERE n.purpose = 'reminder'"
            " AND n.status IN ('pending', 'failed-retrying')"
        )
        waiting = await cur.fetchall()
        if waiting:
            await cur.execute(
                "SELECT id, start_at FROM appointments WHERE status IN ('booked', 'checked-in')"
                " AND id = ANY(%s)",
                [[UUID(source.split(":")[1]) for _, source in waiting]],
            )
            current = {reminder_source(a, start) for a, start in await cur.fetchall()}
            stale = [nid for nid, source in waiting if source not in current]
            if stale:
                await cur.execute(
                    "UPDATE notifications SET status = 'given-up', details = NULL,"
                    " updated_at = now(),"
                    " last_error = 'no longer due: the appointment moved or was cancelled'"
                    " WHERE id = ANY(%s)",
                    [stale],
                )
    return planned


def reminder_source(appointment: UUID, start: datetime) -> str:
    return f"reminder:{appointment}:{start.astimezone(UTC).isoformat()}"
