"""The local SMTP capture, started in the test's own event loop on a free port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ops.local.mailcatcher import serve


@pytest.fixture
async def capture(tmp_path: Path, unused_tcp_port: int) -> AsyncIterator[tuple[Path, int]]:
    """The capture's Maildir and port."""
    for part in ("tmp", "new", "cur"):
        (tmp_path / part).mkdir()
    stop = asyncio.Event()
    server = asyncio.create_task(serve(tmp_path, "127.0.0.1", unused_tcp_port, stop))
    for _ in range(100):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", unused_tcp_port)
        except OSError:
            await asyncio.sleep(0.01)
            continue
        writer.close()
        break
    yield tmp_path, unused_tcp_port
    stop.set()
    await server
