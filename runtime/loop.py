"""The event loop of carelog's long-running processes.

The consumers, the relay, the notifier and billing run on uvloop, as the HTTP services do
under Granian: their work is mostly the event loop's own (socket reads and writes to
Kafka, PostgreSQL and SMTP, callbacks, timers), which uvloop does in C. Under a register
load this took about a fifth off those processes' CPU (docs/benchmarks.md). One-shot
commands (the CLI's tools) keep asyncio's own loop.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run_service(main: Coroutine[Any, Any, T]) -> T:
    """Runs a long-running process's `main` to its end on uvloop."""
    return uvloop.run(main)
