"""Progress of a long job: a bar on a terminal, plain lines on a pipe."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

Advance = Callable[[int], None]


@contextmanager
def events_progress(title: str) -> Iterator[Callable[[int, int], Advance]]:
    """Yields `start(total, done) -> advance(n)`; renders to stderr."""
    if sys.stderr.isatty():
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rate]} events/s"),
            TimeRemainingColumn(),
            transient=False,
        ) as bar:

            def start_bar(total: int, done: int) -> Advance:
                task = bar.add_task(title, total=total, completed=done, rate="-")
                began = time.monotonic()
                count = 0

                def advance(n: int) -> None:
                    nonlocal count
                    count += n
                    rate = count / max(time.monotonic() - began, 1e-6)
                    bar.update(task, advance=n, rate=f"{rate:,.0f}")

                return advance

            yield start_bar
        return

    def start_lines(total: int, done: int) -> Advance:
        began = last = time.monotonic()
        count = 0

        def advance(n: int) -> None:
            nonlocal count, last
            count += n
            now = time.monotonic()
            if now - last >= 2 or done + count >= total:
                rate = count / max(now - began, 1e-6)
                left = max(total - done - count, 0)
                eta = f"{left / rate:.0f}s" if rate else "?"
                print(
                    f"{title}: {done + count}/{total} events, {rate:,.0f}/s, eta {eta}",
                    file=sys.stderr,
                    flush=True,
                )
                last = now

        return advance

    yield start_lines
