"""The local stack's SMTP server: accepts every message on 127.0.0.1:1025 and stores it
as a standard Maildir under .stack/mail/, so any mail tool (and the tests) can read
what was really sent. Health on http://127.0.0.1:4016/health/ready.

A message is stored as it arrived, with the envelope in three headers above it, and
never parsed: parsing and writing it out again cost this server more CPU than the
notifier spends sending it, and the benchmarks run it beside the services.

    uv run python -m ops.local.mailcatcher [MAILDIR] [--smtp-port 1025] [--health-port 4016]
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

ROOT = Path(__file__).resolve().parents[2]


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

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content: Any = envelope.original_content or envelope.content or b""
        trace = (
            f"X-Peer: {session.peer}\nX-MailFrom: {envelope.mail_from}\n"
            f"X-RcptTo: {', '.join(envelope.rcpt_tos)}\n"
        )
        name = f"{time.time_ns()}.P{os.getpid()}Q{next(self._unique)}.carelog"
        draft = self.root / "tmp" / name
        draft.write_bytes(trace.encode() + bytes(content).replace(b"\r\n", b"\n"))
        os.rename(draft, self.root / "new" / name)
        return "250 Message accepted for delivery"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("maildir", nargs="?", default=str(ROOT / ".stack" / "mail"))
    parser.add_argument("--smtp-port", type=int, default=1025)
    parser.add_argument("--health-port", type=int, default=4016)
    args = parser.parse_args()
    for part in ("tmp", "new", "cur"):  # a Maildir, even where the folder already exists
        (Path(args.maildir) / part).mkdir(parents=True, exist_ok=True)
    handler = Maildir(Path(args.maildir))
    controller = Controller(handler, hostname="127.0.0.1", port=args.smtp_port)
    controller.start()
    health = ThreadingHTTPServer(("127.0.0.1", args.health_port), _Health)
    threading.Thread(target=health.serve_forever, daemon=True).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"smtp capture on 127.0.0.1:{args.smtp_port}, maildir {args.maildir}", flush=True)
    stop.wait()
    health.shutdown()
    controller.stop()


if __name__ == "__main__":
    main()
