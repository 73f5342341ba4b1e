"""The local stack's SMTP capture stores what real SMTP clients send, byte for byte (the
notifier's client, aiosmtplib, and the standard library's), and refuses what is wrong."""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path

import aiosmtplib
import pytest

from ops.local import mailcatcher


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


async def test_a_pipelined_group_is_answered_in_one_write(capture: tuple[Path, int]) -> None:
    maildir, port = capture
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await reader.readuntil(b"\r\n"))[:3] == b"220"
    writer.write(b"EHLO client\r\n")
    assert b"250-PIPELINING\r\n" in await reader.readuntil(b"\r\n250 SIZE 33554432\r\n")
    writer.write(b"MAIL FROM:<x@example.org> SIZE=40\r\nRCPT TO:<y@example.org>\r\nDATA\r\n")
    assert await reader.read(4096) == (
        b"250 OK\r\n250 OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
    )
    writer.write(b"Subject: p\r\n\r\n..dot\r\nend\r\n.\r\n")
    assert await reader.readuntil(b"\r\n") == b"250 Message accepted for delivery\r\n"
    writer.write(b"RSET\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<>\r\nDATA\r\n")
    assert await reader.read(4096) == (
        b"250 OK\r\n250 OK\r\n501 Syntax: RCPT TO:<address>\r\n503 Error: need RCPT command\r\n"
    )
    writer.write(b"QUIT\r\n")
    assert await reader.read(4096) == b"221 Bye\r\n"
    assert await reader.read(4096) == b""
    writer.close()
    [stored] = _stored(maildir)
    assert stored.endswith(b"\nSubject: p\n\n.dot\nend\n")


async def test_a_session_sent_in_pieces_of_any_size_is_read_the_same(
    capture: tuple[Path, int],
) -> None:
    maildir, port = capture
    session = (
        b"HELO client\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<y@example.org>\r\nDATA\r\n"
        b".first\r\n.\r.\r\n..\r\nnot the end: \n.x\r\n.\r\n"
        b"MAIL FROM:<x@example.org>\r\nRCPT TO:<z@example.org>\r\nDATA\r\n"
        b".\r\n"  # empty
        b"MAIL FROM:<x@example.org>\r\nRCPT TO:<z@example.org>\r\nDATA\r\n"
        b"bare line feeds\n.\n"
        b"QUIT\r\n"
    )
    for size in (1, 2, 3, 5, 7, len(session)):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(0, len(session), size):
            writer.write(session[i : i + size])
            await writer.drain()
            await asyncio.sleep(0)
        replies = await reader.read(65536)
        while not replies.endswith(b"221 Bye\r\n"):
            replies += await reader.read(65536)
        writer.close()
        assert replies.count(b"250 Message accepted") == 3, (size, replies)
    stored = _stored(maildir)
    assert len(stored) == 18
    bodies = sorted(s.split(b"X-RcptTo: ", 1)[1].split(b"\n", 1)[1] for s in stored)
    assert set(bodies) == {b"", b"bare line feeds\n", b"first\n\r.\n.\nnot the end: \nx\n"}


async def test_what_is_too_long_is_refused(
    capture: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    maildir, port = capture
    monkeypatch.setattr(mailcatcher, "MAX_SIZE", 100)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await reader.readuntil(b"\r\n"))[:3] == b"220"
    big = b"".join(b"line %d of many\r\n" % i for i in range(1000))
    for message, reply in ((big, b"552"), (b"short\r\n", b"250"), (big, b"552")):
        writer.write(b"HELO c\r\nMAIL FROM:<x@example.org>\r\nRCPT TO:<y@example.org>\r\nDATA\r\n")
        data = message + b".\r\n"
        for i in range(0, len(data), 7):  # the end arriving in pieces
            writer.write(data[i : i + 7])
            await writer.drain()
            await asyncio.sleep(0)
        replies = [(await reader.readuntil(b"\r\n"))[:3] for _ in range(5)]
        assert replies == [b"250", b"250", b"250", b"354", reply]
    writer.write(b"NOOP " + b"x" * 2000 + b"\r\n")
    assert (await reader.readuntil(b"\r\n"))[:3] == b"500"
    writer.write(b"NOOP " + b"x" * 2000)  # and no line end: the session ends
    assert (await reader.readuntil(b"\r\n"))[:3] == b"500"
    assert await reader.read(4096) == b""
    writer.close()
    [stored] = _stored(maildir)
    assert stored.endswith(b"\nshort\n")


def test_the_newest_messages_are_kept_and_older_ones_deleted(tmp_path: Path) -> None:
    for part in ("tmp", "new", "cur"):
        (tmp_path / part).mkdir()
    store = mailcatcher.Maildir(tmp_path, keep=3)
    store.deliver("peer", "a@example.org", ["b@example.org"], b"Subject: 0\r\n\r\nx\r\n")
    moved = next((tmp_path / "new").iterdir())
    moved.rename(tmp_path / "cur" / moved.name)  # a mail tool read it: no longer the capture's
    for n in range(1, 6):
        store.deliver(
            "peer", "a@example.org", ["b@example.org"], f"Subject: {n}\r\n\r\nx\r\n".encode()
        )
    kept = [m.rsplit(b"Subject: ", 1)[1][:1] for m in _stored(tmp_path)]
    assert kept == [b"3", b"4", b"5"]
    assert [p.name for p in (tmp_path / "cur").iterdir()] == [moved.name]
    assert list((tmp_path / "tmp").iterdir()) == []
