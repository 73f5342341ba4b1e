"""The local stack's SMTP capture stores what real SMTP clients send, byte for byte (the
notifier's client, aiosmtplib, and the standard library's), and refuses what is wrong."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

import aiosmtplib


def _stored(maildir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((maildir / "new").iterdir())]


async def test_messages_of_one_session_are_stored_as_sent_with_their_envelope(
    capture: tuple[Path, int],
) -> None:
    maildir, port = capture
    first = b"Subject: one\r\n\r\n.a line the client dot-stuffs\r\n..two dots\r\nend\r\n"
    second = "Subject: two\r\n\r\nZo\u00eb's visit\r\n".encode()
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        await client.sendmail("practice@example.org", ["a@example.org"], first)
        await client.sendmail(
            "practice@example.org",
            ["zo\u00eb@example.org", "b@example.org"],
            second,
            mail_options=["SMTPUTF8", "BODY=8BITMIME"],
        )
    stored = _stored(maildir)
    assert len(stored) == 2
    envelope, _, body = stored[0].partition(b"Subject:")
    assert b"X-MailFrom: practice@example.org\n" in envelope
    assert b"X-RcptTo: a@example.org\n" in envelope
    assert b"Subject:" + body == first.replace(b"\r\n", b"\n")
    assert "X-RcptTo: zo\u00eb@example.org, b@example.org\n".encode() in stored[1]
    assert stored[1].endswith("Zo\u00eb's visit\n".encode())


async def test_the_standard_librarys_client_is_served_too(capture: tuple[Path, int]) -> None:
    maildir, port = capture

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", port) as client:
            assert client.ehlo()[0] == 250
            assert client.has_extn("size") and client.has_extn("smtputf8")
            client.sendmail("x@example.org", ["y@example.org"], "Subject: s\r\n\r\n.\r\nbody\r\n")
            assert client.noop()[0] == 250
            assert client.rset()[0] == 250

    await asyncio.to_thread(send)
    [stored] = _stored(maildir)
    assert stored.endswith(b"Subject: s\n\n.\nbody\n")


async def test_commands_out_of_order_or_unknown_are_refused_and_store_nothing(
    capture: tuple[Path, int],
) -> None:
    maildir, port = capture
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def say(line: bytes) -> bytes:
        writer.write(line + b"\r\n")
        await writer.drain()
        return (await reader.readuntil(b"\r\n"))[:3]

    assert (await reader.readuntil(b"\r\n"))[:3] == b"220"
    assert await say(b"HELO client") == b"250"
    assert await say(b"RCPT TO:<a@example.org>") == b"503"
    assert await say(b"DATA") == b"503"
    assert await say(b"MAIL FROM:no-brackets") == b"501"
    assert await say(b"MAIL FROM:<x@example.org>") == b"250"
    assert await say(b"RCPT TO:<>") == b"501"
    assert await say(b"DATA") == b"503"
    assert await say(b"VRFY someone") == b"502"
    assert await say(b"QUIT") == b"221"
    writer.close()
    assert _stored(maildir) == []
