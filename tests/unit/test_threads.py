"""A request's blocking work in a thread: it sees the request's context variables, its
error reaches the request, and a cancelled request still waits for the call to end."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from runtime.threads import in_thread

REQUEST = contextvars.ContextVar("request", default="none")


async def test_the_call_runs_in_another_thread_with_the_requests_context():
    REQUEST.set("r-1")
    here = threading.get_ident()
    seen = await in_thread(lambda: (REQUEST.get(), threading.get_ident()))
    assert seen[0] == "r-1" and seen[1] != here


async def test_the_calls_error_reaches_the_request():
    def refuse(code: int) -> None:
        raise ValueError(f"refused {code}")

    with pytest.raises(ValueError, match="refused 409"):
        await in_thread(refuse, 409)


async def test_a_cancelled_request_waits_for_the_call_to_end():
    started, ended = threading.Event(), threading.Event()

    def slow() -> None:
        started.set()
        time.sleep(0.3)
        ended.set()

    task = asyncio.create_task(in_thread(slow))
    assert await asyncio.to_thread(started.wait, 5)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # still waiting for the call
    with pytest.raises(asyncio.CancelledError):
        await task
    assert ended.is_set()
