"""The local stack's SMTP server: accepts every message on 127.0.0.1:1025 and stores it
as a standard Maildir under .stack/mail/, so any mail tool (and the tests) can read
what was really sent. Health on http://127.0.0.1:4016/health/ready.

A message is stored as it arrived, with the envelope in three headers above it, and
never parsed. The server speaks just the SMTP a sender of mail needs (EHLO/HELO, MAIL,
RCPT, DATA, RSET, NOOP, QUIT; 8BITMIME, SMTPUTF8, SIZE and PIPELINING advertised), and
reads an address as what stands between its angle brackets: a full SMTP library parsing
every address as an email header cost this server more CPU per message than the
notifier spends sending it, and the benchmarks run it beside the services. For the same
reason it answers all the commands of one read in one write (a pipelining client's MAIL,
RCPT and DATA get their three replies together, as RFC 2920 has it) and finds a
message's end in one search, not line by line. It stands in for the practice's mail
relay; it is no mail server to expose.

    uv run python -m ops.local.mailcatcher [MAILDIR] [--host 127.0.0.1] [--smtp-port 1025]
        [--health-port 4016] [--keep 10000]

`--host 0.0.0.0` in a container, so that the notifier's container reaches it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_SIZE = 32 * 1024 * 1024
"""The largest message taken (advertised as SIZE); anything longer is refused, 552."""
MAX_LINE = 1024
"""The longest command line taken (RFC 5321 allows 512 octets; extensions add some)."""


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.path in ("/health/live", "/health/ready")
        self.send_response(200 if ok else 404)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"status":"ready"}' if ok else b'{"status":404}')

    def log_message(self, *args: object) -> None:
        pass


KEEP = 10_000
"""How many of the messages it delivered the capture keeps in new/ (`--keep`)."""


class Maildir:
    """Delivers each message into a Maildir: written under tmp/, then renamed into new/.

    Keeps the newest `keep` of the messages it delivered: each one past that deletes the
    oldest (unless a mail tool has moved it on). A benchmark sends hundreds of thousands
    of welcome emails; kept, they made every later delivery slower (a folder of millions
    of files) and had the kernel write each to disk, where one kept a few seconds never
    gets there."""

    def __init__(self, root: Path, keep: int = KEEP):
        self.root = root
        self.keep = keep
        self._unique = itertools.count()
        self._kept: collections.deque[Path] = collections.deque()

    def deliver(self, peer: str, mail_from: str, rcpt_tos: list[str], content: bytes) -> None:
        trace = f"X-Peer: {peer}\nX-MailFrom: {mail_from}\nX-RcptTo: {', '.join(rcpt_tos)}\n"
        name = f"{time.time_ns()}.P{os.getpid()}Q{next(self._unique)}.carelog"
        draft = self.root / "tmp" / name
        draft.write_bytes(trace.encode() + content.replace(b"\r\n", b"\n"))
        delivered = self.root / "new" / name
        os.rename(draft, delivered)
        self._kept.append(delivered)
        while len(self._kept) > self.keep:
            with contextlib.suppress(FileNotFoundError):
                self._kept.popleft().unlink()


def _address(argument: bytes, keyword: bytes) -> str | None:
    """The address of `FROM:<a@b> OPTIONS` (or `TO:`), None if there is none to read."""
    if argument[: len(keyword)].upper() != keyword:
        return None
    rest = argument[len(keyword) :].strip()
    if not rest.startswith(b"<") or b">" not in rest:
        return None
    return rest[1 : rest.index(b">")].decode("utf-8", "replace")


_BUFFERED = frozenset((b"MAIL", b"RCPT", b"RSET"))
"""Commands whose replies wait for the rest of what was read (RFC 2920: a server answers
EHLO, DATA, NOOP, QUIT and what it does not know at once)."""


class Session(asyncio.Protocol):
    """One client's SMTP session (RFC 5321's commands a sender of mail uses).

    Reads whatever has arrived and answers the whole commands in it together, in one
    write (a pipelining client's MAIL, RCPT and DATA get their three replies in one), and
    a message's data up to its lone `.` line in one search, not line by line."""

    def __init__(self, maildir: Maildir, hostname: bytes):
        self.maildir = maildir
        self.hostname = hostname
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.buffer = bytearray()
        self.mail_from: str | None = None
        self.rcpt_tos: list[str] = []
        self.data = False
        """Reading a message: the buffer holds it from the line break that ended DATA
        (kept, so that each of its lines, the first too, follows a line break)."""
        self.scanned = 0
        """How far the message has been searched for its end."""
        self.oversized = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.peer = str(transport.get_extra_info("peername"))
        transport.write(b"220 " + self.hostname + b" carelog mail capture ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self.buffer += data
        replies = bytearray()
        start = 0
        while True:
            if self.data:
                end = self._end_of_data(start)
                if end is None:
                    break
                replies += self._deliver(start, end)
                start = end
                continue
            end = self.buffer.find(b"\n", start)
            if end < 0:
                if len(self.buffer) - start > MAX_LINE:
                    transport.write(bytes(replies) + b"500 Error: line too long\r\n")
                    transport.close()
                    return
                break
            line = bytes(self.buffer[start:end]).rstrip(b"\r")
            start = end + 1
            verb, _, argument = line.partition(b" ")
            verb = verb.upper()
            if len(line) > MAX_LINE:
                replies += b"500 Error: line too long\r\n"
            elif verb == b"QUIT":
                transport.write(bytes(replies) + b"221 Bye\r\n")
                transport.close()
                return
            else:
                replies += self._command(verb, argument)
                if self.data:
                    start = end  # the message follows this line break: kept with it
            if verb not in _BUFFERED and replies:
                transport.write(bytes(replies))
                replies.clear()
        del self.buffer[:start]
        # A message now starts the buffer (`scanned` counts from there). One too long is
        # kept no further, but read to its end all the same.
        if self.data and len(self.buffer) > MAX_SIZE + 8:
            self.oversized = True
            del self.buffer[:-4]  # enough to find an end that is still arriving
            self.scanned = 0
        if replies:
            transport.write(bytes(replies))

    def _command(self, verb: bytes, argument: bytes) -> bytes:
        if verb == b"EHLO":
            self.mail_from, self.rcpt_tos = None, []
            return (
                b"250-" + self.hostname + b"\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                b"250-PIPELINING\r\n250 SIZE %d\r\n" % MAX_SIZE
            )
        if verb == b"HELO":
            self.mail_from, self.rcpt_tos = None, []
            return b"250 " + self.hostname + b"\r\n"
        if verb == b"MAIL":
            self.mail_from = _address(argument, b"FROM:")
            self.rcpt_tos = []
            ok = self.mail_from is not None
            return b"250 OK\r\n" if ok else b"501 Syntax: MAIL FROM:<address>\r\n"
        if verb == b"RCPT":
            rcpt = _address(argument, b"TO:")
            if self.mail_from is None:
                return b"503 Error: need MAIL command\r\n"
            if not rcpt:
                return b"501 Syntax: RCPT TO:<address>\r\n"
            self.rcpt_tos.append(rcpt)
            return b"250 OK\r\n"
        if verb == b"DATA":
            if not self.rcpt_tos or self.mail_from is None:
                return b"503 Error: need RCPT command\r\n"
            self.data, self.scanned, self.oversized = True, 0, False
            return b"354 End data with <CR><LF>.<CR><LF>\r\n"
        if verb == b"RSET":
            self.mail_from, self.rcpt_tos = None, []
            return b"250 OK\r\n"
        if verb == b"NOOP":
            return b"250 OK\r\n"
        return b"502 Error: command not implemented\r\n"

    def _end_of_data(self, start: int) -> int | None:
        """Where the message that starts at `start` (at the line break before it) ends,
        after its lone `.` line; None if that has not arrived yet."""
        at = start + self.scanned
        while (found := self.buffer.find(b"\n.", at)) >= 0:
            after = self.buffer[found + 2 : found + 4]
            if after[:1] == b"\n":
                return found + 3
            if after == b"\r\n":
                return found + 4
            if after in (b"", b"\r"):  # the line's end is still to come
                at = found
                break
            at = found + 2
        else:
            at = max(start, len(self.buffer) - 1)
        self.scanned = at - start
        return None

    def _deliver(self, start: int, end: int) -> bytes:
        """Stores the message between `start` and `end` (dot-stuffing undone) and answers."""
        lines = self.buffer[start : self.buffer.rindex(b"\n.", start, end) + 1]
        content = bytes(lines).replace(b"\n.", b"\n")[1:]
        mail_from, rcpt_tos = self.mail_from, self.rcpt_tos
        self.mail_from, self.rcpt_tos, self.data = None, [], False
        if self.oversized or len(content) > MAX_SIZE or mail_from is None:
            return b"552 Error: too much mail data\r\n"
        self.maildir.deliver(self.peer, mail_from, rcpt_tos, content)
        return b"250 Message accepted for delivery\r\n"


async def serve(maildir: Path, host: str, port: int, stop: asyncio.Event, keep: int = KEEP) -> None:
    store = Maildir(maildir, keep)
    server = await asyncio.get_running_loop().create_server(
        lambda: Session(store, b"mail.carelog.invalid"), host, port
    )
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("maildir", nargs="?", default=str(ROOT / ".stack" / "mail"))
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--smtp-port", type=int, default=1025)
    parser.add_argument("--health-port", type=int, default=4016)
    parser.add_argument(
        "--keep", type=int, default=KEEP, help="messages kept in new/ (the newest delivered)"
    )
    args = parser.parse_args()
    for part in ("tmp", "new", "cur"):  # a Maildir, even where the folder already exists
        (Path(args.maildir) / part).mkdir(parents=True, exist_ok=True)
    health = ThreadingHTTPServer((args.host, args.health_port), _Health)
    threading.Thread(target=health.serve_forever, daemon=True).start()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(f"smtp capture on {args.host}:{args.smtp_port}, maildir {args.maildir}", flush=True)
        await serve(Path(args.maildir), args.host, args.smtp_port, stop, args.keep)

    asyncio.run(run())
    health.shutdown()


if __name__ == "__main__":
    main()
