"""A small keep-alive HTTP/1.1 client for load: benchmarks and burst tests.

httpx spends about a millisecond of CPU per request, which on a small machine
caps a Python load generator near 150 requests/s: the client would be what is
measured. This client writes a prepared request and reads one response on a
persistent connection, so the server side dominates the timings.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    """One persistent connection to `base_url` (http only); reconnects when the server closes."""

    def __init__(self, base_url: str):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError("an http:// URL with a host is required")
        self.host = parts.hostname
        self.port = parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            await self._writer.wait_closed()
            self._reader = self._writer = None

    async def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | None = None,
        json_body: Any = None,
    ) -> Reply:
        body = b"" if json_body is None else json.dumps(json_body).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        if json_body is not None:
            lines.append("Content-Type: application/json")
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        for attempt in (1, 2):
            if self._writer is None:
                await self._open()
            assert self._reader is not None and self._writer is not None
            start = time.perf_counter()
            try:
                self._writer.write(raw)
                await self._writer.drain()
                return await self._read(start)
            except (ConnectionError, asyncio.IncompleteReadError):
                await self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _read(self, start: float) -> Reply:
        assert self._reader is not None
        head = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for line in header_lines:
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).strip(), 16)
                chunk = await self._reader.readexactly(size + 2)
                if size == 0:
                    break
                body += chunk[:-2]
        else:
            body = await self._reader.readexactly(int(headers.get("content-length", "0")))
        reply = Reply(status, headers, body, time.perf_counter() - start)
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return reply


def percentile(samples: list[float], fraction: float) -> float:
    """The `fraction` (0..1) percentile of samples, nearest rank."""
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[rank]
