"""Blocking work of a request, run in a thread of the process's own pool.

    written = await in_thread(service.register, details, registered)

The same contract as `anyio.to_thread.run_sync` (the call sees the request's context
variables; a cancelled request still waits for the call to end, which cannot be stopped
once begun), at about half the CPU per call: asyncio's executor hand-off without anyio's
limiter, backend lookup and cancel scope, which together cost a small write about 40 us.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

THREADS = 40
"""Calls in flight at once (anyio's default limit, which this replaces)."""

_pool = ThreadPoolExecutor(THREADS, thread_name_prefix="request")


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a pool thread, with this task's context; its result or its error."""
    context = contextvars.copy_context()
    future = asyncio.get_running_loop().run_in_executor(_pool, context.run, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        # The call goes on in its thread: wait for it, then let the cancellation through.
        while not future.done():
            try:
                await asyncio.wait([future])
            except asyncio.CancelledError:
                continue
        raise
