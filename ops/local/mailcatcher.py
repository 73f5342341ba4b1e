"""The local stack's SMTP server: accepts every message on 127.0.0.1:1025 and stores it
as a standard Maildir under .stack/mail/, so any mail tool (and the tests) can read
what was really sent. Health on http://127.0.0.1:4016/health/ready.

A message is stored as it arrived, with the envelope in three headers above it, and
never parsed. The server speaks just the SMTP a sender of mail needs (EHLO/HELO, MAIL,
RCPT, DATA, RSET, NOOP, QUIT; 8BITMIME, SMTPUTF8, SIZE and PIPELINING advertised), and
reads an address as what stands between its angle brackets: a full SMTP library parsing
every address as an email header cost this server more CPU per message than the
notifier spends sending it, and the benchmarks run it beside the services. It stands in
for the practice's mail relay; it is no mail server to expose.

    uv run python -m ops.local.mailcatcher [MAILDIR] [--host 127.0.0.1] [--smtp-port 1025]
        [--health-port 4016]

`--host 0.0.0.0` in a container, so that the notifier's container reaches it.
"""

from __future__ import annotations

import argparse
import asyncio
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


class Maildir:
    """Delivers each message into a Maildir: written under tmp/, then renamed into new/."""

    def __init__(self, root: Path):
        self.root = root
        self._unique = itertools.count()

    def deliver(self, peer: str, mail_from: str, rcpt_tos: list[str], content: bytes) -> None:
        trace = f"X-Peer: {peer}\nX-MailFrom: {mail_from}\nX-RcptTo: {', '.join(rcpt_tos)}\n"
        name = f"{time.time_ns()}.P{os.getpid()}Q{next(self._unique)}.carelog"
        draft = self.root / "tmp" / name
        draft.write_bytes(trace.encode() + content.replace(b"\r\n", b"\n"))
        os.rename(draft, self.root / "new" / name)


def _address(argument: bytes, keyword: bytes) -> str | None:
    """The address of `FROM:<a@b> OPTIONS` (or `TO:`), None if there is none to read."""
    if argument[: len(keyword)].upper() != keyword:
        return None
    rest = argument[len(keyword) :].strip()
    if not rest.startswith(b"<") or b">" not in rest:
        return None
    return rest[1 : rest.index(b">")].decode("utf-8", "replace")


class Session:
    """One client's SMTP session (RFC 5321's commands a sender of mail uses)."""

    def __init__(self, maildir: Maildir, hostname: str):
        self.maildir = maildir
        self.hostname = hostname.encode()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = str(writer.get_extra_info("peername"))
        mail_from: str | None = None
        rcpt_tos: list[str] = []
        writer.write(b"220 " + self.hostname + b" carelog mail capture ESMTP\r\n")
        try:
            while True:
                line = await reader.readuntil(b"\n")
                verb, _, argument = line.rstrip(b"\r\n").partition(b" ")
                verb = verb.upper()
                if verb == b"EHLO":
                    mail_from, rcpt_tos = None, []
                    writer.write(
                        b"250-" + self.hostname + b"\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n"
                        b"250-PIPELINING\r\n250 SIZE %d\r\n" % MAX_SIZE
                    )
                elif verb == b"HELO":
                    mail_from, rcpt_tos = None, []
                    writer.write(b"250 " + self.hostname + b"\r\n")
                elif verb == b"MAIL":
                    mail_from = _address(argument, b"FROM:")
                    rcpt_tos = []
                    ok = mail_from is not None
                    writer.write(b"250 OK\r\n" if ok else b"501 Syntax: MAIL FROM:<address>\r\n")
                elif verb == b"RCPT":
                    rcpt = _address(argument, b"TO:")
                    if mail_from is None:
                        writer.write(b"503 Error: need MAIL command\r\n")
                    elif not rcpt:
                        writer.write(b"501 Syntax: RCPT TO:<address>\r\n")
                    else:
                        rcpt_tos.append(rcpt)
                        writer.write(b"250 OK\r\n")
                elif verb == b"DATA":
                    if not rcpt_tos or mail_from is None:
                        writer.write(b"503 Error: need RCPT command\r\n")
                        continue
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    content = await self._data(reader)
                    if content is None:
                        writer.write(b"552 Error: too much mail data\r\n")
                    else:
                        self.maildir.deliver(peer, mail_from, rcpt_tos, content)
                        writer.write(b"250 Message accepted for delivery\r\n")
                    mail_from, rcpt_tos = None, []
                elif verb == b"RSET":
                    mail_from, rcpt_tos = None, []
                    writer.write(b"250 OK\r\n")
                elif verb == b"NOOP":
                    writer.write(b"250 OK\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 Bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"502 Error: command not implemented\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @staticmethod
    async def _data(reader: asyncio.StreamReader) -> bytes | None:
        """The message up to its lone `.` line, dot-stuffing undone; None if over MAX_SIZE
        (read to its end all the same, so the session can go on)."""
        chunks: list[bytes] = []
        size = 0
        while True:
            line = await reader.readuntil(b"\n")  # whole lines: each starts a line
            if line in (b".\r\n", b".\n"):
                break
            chunk = line[1:] if line.startswith(b".") else line
            size += len(chunk)
            if size <= MAX_SIZE:
                chunks.append(chunk)
        return b"".join(chunks) if size <= MAX_SIZE else None


async def serve(maildir: Path, host: str, port: int, stop: asyncio.Event) -> None:
    server = await asyncio.start_server(
        Session(Maildir(maildir), "mail.carelog.invalid"), host, port, limit=64 * 1024
    )
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("maildir", nargs="?", default=str(ROOT / ".stack" / "mail"))
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--smtp-port", type=int, default=1025)
    parser.add_argument("--health-port", type=int, default=4016)
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
        await serve(Path(args.maildir), args.host, args.smtp_port, stop)

    asyncio.run(run())
    health.shutdown()


if __name__ == "__main__":
    main()
