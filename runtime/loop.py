"""The event loop of carelog's long-running processes.

The consumers, the relay, the notifier and billing run on uvloop, as the HTTP services do
under Granian: their work is mostly the event loop's own (socket reads and writes to
Kafka, PostgreSQL and SMTP, callbacks, timers), which uvloop does in C. Under a register
load at about 700 a second this took about an eighth off the consumers' CPU per
registration, and they kept up where they had fallen seconds behind (docs/benchmarks.md).
One-shot commands (the CLI's tools) keep asyncio's own loop.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run_service(main: Coroutine[Any, Any, T]) -> T:
    """Runs a long-running process's `main` to its end on uvloop."""
    return uvloop.run(main)
