"""The notifier's SMTP transaction on real sockets: with a server that advertises
PIPELINING, MAIL, RCPT and DATA go in one write and the message arrives as composed;
refusals map as they always did (5xx permanent, 4xx temporary) and deliver nothing,
even from a server that says 354 with no recipient; a server without PIPELINING gets a
command at a time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from uuid import uuid4

import aiosmtplib
import pytest
import uvloop

from notifications.config import NotifierConfig
from notifications.mail import Headers, Mail, compose
from notifications.sender import Permanent, Sender, _pipelined

FROM = "no-reply@carelog.invalid"
BODY = (
    b"Subject: dots\r\n\r\n.a line that starts with a dot\r\n..and two\r\n.\r\n"
    b"a lone dot above; a bare\nline feed and a bare\rreturn\r\nend"
)
"""A message whose lines need stuffing and normalising on the wire."""
SENT = (
    b"Subject: dots\r\n\r\n.a line that starts with a dot\r\n..and two\r\n.\r\n"
    b"a lone dot above; a bare\r\nline feed and a bare\r\nreturn\r\nend\r\n"
)
"""What a server must read back from BODY."""


def mail(recipient: str = "ann@example.org", data: bytes = BODY) -> Mail:
    return Mail(FROM, recipient, [] if recipient.isascii() else ["SMTPUTF8"], data)


class Scripted:
    """An SMTP server that answers as a test tells it. It answers all the whole commands
    in what it has read at once (as RFC 2920 lets a server do), and records which
    commands came in each read, and what it was given to deliver."""

    def __init__(
        self,
        *,
        pipelining: bool = True,
        mail: bytes = b"250 OK",
        rcpt: dict[str, bytes] | None = None,
        data: bytes = b"354 go on",
        end: bytes = b"250 queued",
        lenient: bool = False,
        split: bool = False,
        silent: bool = False,
        drop: bool = False,
    ) -> None:
        self.extensions = [b"SMTPUTF8", b"8BITMIME", b"SIZE 1000000"]
        if pipelining:
            self.extensions.append(b"PIPELINING")
        self.answers = {b"MAIL": mail, b"DATA": data, b".": end}
        self.rcpt = rcpt or {}
        self.lenient = lenient
        """Says 354 to DATA even when no recipient was accepted (RFC 2920 says not to)."""
        self.split = split
        """Writes each reply on its own, a moment after the one before."""
        self.silent = silent
        """Answers nothing after EHLO."""
        self.drop = drop
        """Hangs up on MAIL."""
        self.reads: list[list[bytes]] = []
        self.commands: list[bytes] = []
        self.delivered: list[tuple[str, list[str], bytes]] = []
        self.unfinished = 0
        """Connections that ended in the middle of a message's data."""
        self.connections = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(b"220 scripted ESMTP\r\n")
        buffer = b""
        mail_from: str | None = None
        recipients: list[str] = []
        body: bytearray | None = None
        try:
            while chunk := await reader.read(65536):
                buffer += chunk
                replies: list[bytes] = []
                verbs: list[bytes] = []
                while (end := buffer.find(b"\n")) >= 0:
                    line, buffer = buffer[: end + 1], buffer[end + 1 :]
                    if body is not None:
                        if line == b".\r\n":
                            assert mail_from is not None
                            self.delivered.append((mail_from, recipients, bytes(body)))
                            mail_from, recipients, body = None, [], None
                            replies.append(self.answers[b"."])
                        else:
                            body += line[1:] if line.startswith(b".") else line
                        continue
                    self.commands.append(line)
                    verb = line.split(b" ", 1)[0].strip().upper()
                    verbs.append(verb)
                    address = line.partition(b"<")[2].partition(b">")[0].decode()
                    if verb == b"EHLO":
                        lines = [b"scripted", *self.extensions]
                        replies.append(
                            b"".join(b"250-" + x + b"\r\n" for x in lines[:-1])
                            + b"250 "
                            + lines[-1]
                        )
                    elif verb == b"MAIL" and self.drop:
                        return
                    elif verb == b"MAIL":
                        replies.append(self.answers[b"MAIL"])
                        if replies[-1].startswith(b"250"):
                            mail_from, recipients = address, []
                    elif verb == b"RCPT":
                        replies.append(self.rcpt.get(address, b"250 OK"))
                        if replies[-1].startswith(b"250") and mail_from is not None:
                            recipients.append(address)
                    elif verb == b"DATA":
                        if (recipients and mail_from is not None) or self.lenient:
                            replies.append(self.answers[b"DATA"])
                        else:
                            replies.append(b"554 no valid recipients")
                        if replies[-1].startswith(b"354"):
                            body = bytearray()
                    elif verb == b"RSET":
                        mail_from, recipients, body = None, [], None
                        replies.append(b"250 OK")
                    elif verb == b"QUIT":
                        writer.write(b"221 bye\r\n")
                        return
                    else:
                        replies.append(b"502 not here")
                if verbs:
                    self.reads.append(verbs)
                if self.silent and verbs != [b"EHLO"]:
                    continue
                if self.split:
                    for reply in replies:
                        writer.write(reply + b"\r\n")
                        await writer.drain()
                        await asyncio.sleep(0.005)
                elif replies:
                    writer.write(b"".join(r + b"\r\n" for r in replies))
            if body is not None:
                self.unfinished += 1
        except ConnectionError:
            if body is not None:
                self.unfinished += 1
        finally:
            writer.close()


async def serving(script: Scripted) -> tuple[asyncio.Server, Sender]:
    server = await asyncio.start_server(script, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, Sender(None, NotifierConfig(smtp_port=port), "UTC")  # type: ignore[arg-type]


@pytest.fixture
async def scripted() -> AsyncIterator[Callable[..., Awaitable[tuple[Scripted, Sender]]]]:
    """Starts a Scripted server (keyword arguments as Scripted's) and a sender for it."""
    started: list[tuple[asyncio.Server, Sender]] = []

    async def start(**script: Any) -> tuple[Scripted, Sender]:
        server, sender = await serving(handler := Scripted(**script))
        started.append((server, sender))
        return handler, sender

    yield start
    for server, sender in started:
        await sender._hang_up()
        server.close()
        await server.wait_closed()


async def test_a_pipelining_server_gets_mail_rcpt_and_data_in_one_write(scripted) -> None:
    script, sender = await scripted()
    await sender._deliver(mail())
    await sender._deliver(mail("zo\u00eb@example.org"))
    assert script.reads[1:] == [[b"MAIL", b"RCPT", b"DATA"]] * 2  # after EHLO
    assert script.delivered == [
        (FROM, ["ann@example.org"], SENT),
        (FROM, ["zo\u00eb@example.org"], SENT),
    ]
    assert script.connections == 1
    utf8 = [c for c in script.commands if c.startswith(b"MAIL")][1]
    assert utf8.split()[2:] == [b"SIZE=%d" % len(SENT), b"SMTPUTF8"]


async def test_replies_that_arrive_one_by_one_are_each_read(scripted) -> None:
    script, sender = await scripted(split=True)
    for _ in range(3):
        await sender._deliver(mail())
    assert len(script.delivered) == 3


def test_pipelining_on_uvloop_as_the_notifier_runs() -> None:
    async def run() -> list[tuple[str, list[str], bytes]]:
        script = Scripted(split=True)
        server, sender = await serving(script)
        async with server:
            await sender._deliver(mail())
            await sender._deliver(mail("zo\u00eb@example.org"))
            await sender._hang_up()
        assert script.reads[1:] == [[b"MAIL", b"RCPT", b"DATA"]] * 2
        return script.delivered

    assert [d[2] for d in uvloop.run(run())] == [SENT, SENT]


async def test_a_refused_recipient_is_permanent_delivers_nothing_and_the_session_goes_on(
    scripted,
) -> None:
    script, sender = await scripted(rcpt={"gone@example.org": b"550 5.1.1 no such mailbox"})
    with pytest.raises(Permanent, match=r"^address refused: 550$"):
        await sender._deliver(mail("gone@example.org"))
    assert script.delivered == []
    assert script.reads[1:] == [[b"MAIL", b"RCPT", b"DATA"], [b"RSET"]]
    await sender._deliver(mail())
    assert [d[1] for d in script.delivered] == [["ann@example.org"]]
    assert script.connections == 1


async def test_a_recipient_refused_for_now_is_a_temporary_failure(scripted) -> None:
    script, sender = await scripted(rcpt={"busy@example.org": b"451 4.3.0 try again later"})
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await sender._deliver(mail("busy@example.org"))
    assert [r.code for r in refused.value.recipients] == [451]  # the sender's retry
    assert script.delivered == []


async def test_a_server_saying_354_with_no_recipient_gets_no_message_at_all(scripted) -> None:
    script, sender = await scripted(
        rcpt={"gone@example.org": b"550 5.1.1 no such mailbox"}, lenient=True
    )
    with pytest.raises(Permanent, match=r"^address refused: 550$"):
        await sender._deliver(mail("gone@example.org"))
    await sender._deliver(mail())  # on a new connection
    for _ in range(100):
        if script.unfinished:
            break
        await asyncio.sleep(0.01)
    assert script.unfinished == 1, "the data was left unended: the connection closed"
    assert [d[1] for d in script.delivered] == [["ann@example.org"]]
    assert script.connections == 2


async def test_a_server_that_hangs_up_mid_group_is_a_temporary_failure(scripted) -> None:
    _, sender = await scripted(drop=True)
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await sender._deliver(mail())
    assert sender._smtp is None  # the next message connects anew


async def test_a_server_that_does_not_answer_times_out_and_is_hung_up_on() -> None:
    script = Scripted(silent=True)
    server, _ = await serving(script)
    async with server:
        port = server.sockets[0].getsockname()[1]
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=0.2)
        await client.connect()  # and EHLO
        with pytest.raises(aiosmtplib.SMTPReadTimeoutError):
            await _pipelined(client, mail())
        assert not client.is_connected
    assert script.reads[1:] == [[b"MAIL", b"RCPT", b"DATA"]]
    assert script.delivered == []


@pytest.mark.parametrize(
    ("replies", "error"),
    [
        ({"mail": b"550 5.7.1 not you"}, "smtp 550"),
        ({"mail": b"421 4.3.2 closing"}, None),
        ({"data": b"554 5.3.4 no"}, "smtp 554"),
        ({"data": b"451 4.3.0 later"}, None),
        ({"end": b"552 5.3.4 too big"}, "smtp 552"),
        ({"end": b"451 4.3.0 later"}, None),
    ],
)
async def test_other_refusals_map_as_before(
    scripted, replies: dict[str, bytes], error: str | None
) -> None:
    script, sender = await scripted(**replies)
    if error:
        with pytest.raises(Permanent, match=rf"^{error}$"):
            await sender._deliver(mail())
    else:
        with pytest.raises(aiosmtplib.SMTPResponseException) as failed:
            await sender._deliver(mail())
        assert 400 <= failed.value.code < 500
    delivered = 1 if "end" in replies else 0  # the server's to keep or drop: it said no
    assert len(script.delivered) == delivered


async def test_a_server_without_pipelining_gets_a_command_at_a_time(scripted) -> None:
    script, sender = await scripted(pipelining=False)
    await sender._deliver(mail())
    assert script.reads[1:] == [[b"MAIL"], [b"RCPT"], [b"DATA"]]
    assert script.delivered == [(FROM, ["ann@example.org"], SENT)]
    _, refusing = await scripted(pipelining=False, rcpt={"ann@example.org": b"550 no"})
    with pytest.raises(Permanent, match=r"^address refused: 550$"):
        await refusing._deliver(mail())


async def test_a_pipelined_delivery_reaches_the_capture_as_composed(
    capture: tuple[Path, int],
) -> None:
    maildir, port = capture
    sender = Sender(None, NotifierConfig(smtp_port=port), "UTC")  # type: ignore[arg-type]
    headers = Headers.of("Praxis M\u00fcller <no-reply@carelog.invalid>", {"welcome": "Hi"})
    composed = compose(
        headers,
        recipient="zo\u00eb@example.org",
        message_id=uuid4(),
        purpose="welcome",
        text=".starts with a dot\n..and two\nZo\u00eb\n",
        html="<p>Zo\u00eb</p>",
    )
    try:
        await sender._deliver(composed)
        await sender._deliver(mail())
        assert sender._smtp is not None and sender._smtp.supports_extension("pipelining")
    finally:
        await sender._hang_up()
    first, second = (p.read_bytes() for p in sorted((maildir / "new").iterdir()))
    _, mail_from, rcpt_to, data = first.split(b"\n", 3)
    assert (mail_from, rcpt_to) == (
        b"X-MailFrom: no-reply@carelog.invalid",
        "X-RcptTo: zo\u00eb@example.org".encode(),
    )
    assert data == composed.data.replace(b"\r\n", b"\n")
    assert second.endswith(SENT.replace(b"\r\n", b"\n"))
