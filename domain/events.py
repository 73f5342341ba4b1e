"""What every carelog event records beyond its facts: its declared metadata.

`TracedAggregate` is the base of carelog's aggregates. Its events carry a
`correlation_id` field, part of the event's declared (dataclass) schema and so
stored with it in the event store and published in its envelope. A use case sets
the id for the events it causes with `correlated(...)`; events decided outside
any request (a process reacting to another event) carry the id of their cause.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import field

from eventsourcing.domain import Aggregate

CORRELATION_ID: ContextVar[str | None] = ContextVar("carelog_correlation_id", default=None)
"""The correlation id of the request or event being handled, if any."""


@contextmanager
def correlated(correlation_id: str | None) -> Iterator[None]:
    """Every event created inside the block records `correlation_id`."""
    token = CORRELATION_ID.set(correlation_id)
    try:
        yield
    finally:
        CORRELATION_ID.reset(token)


class TracedAggregate(Aggregate):
    """An aggregate whose events record the correlation id they were caused under."""

    class Event(Aggregate.Event):
        correlation_id: str | None = field(default=None, kw_only=True)
        """The request or event that caused this one (None for events stored before it)."""

        def __post_init__(self) -> None:
            if self.correlation_id is None:
                # Frozen dataclass: the documented way to set a field while initialising.
                object.__setattr__(self, "correlation_id", CORRELATION_ID.get())

    class Created(Event, Aggregate.Created):
        pass
