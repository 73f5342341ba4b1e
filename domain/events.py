"""What every carelog event records beyond its facts: its declared metadata.

`TracedAggregate` is the base of carelog's aggregates. Its events carry a
`correlation_id` and the actor who caused them (`actor_id`, `actor_role`): fields
of the event's declared (dataclass) schema, so stored with it in the event store
and published in its envelope. A use case sets the correlation id for the events it
causes with `correlated(...)`; the actor is the request's verified user, set once
per request with `acting_as(...)` where the token is checked (`runtime.security`),
and carried into the worker thread that decides the events (context variables are
copied there). Events decided outside any request (a process reacting to another
event) carry the correlation id and the actor of their cause, or the named system
actor of that process when the cause recorded none. Events stored before these
fields existed load with them None.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from copy import deepcopy
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate

CORRELATION_ID: ContextVar[str | None] = ContextVar("carelog_correlation_id", default=None)
"""The correlation id of the request or event being handled, if any."""

SYSTEM_ROLE = "system"
"""The role of a named system actor: a process of carelog's own, not a person."""


@dataclass(frozen=True)
class Actor:
    """Who caused an event: a user (the token's subject and role) or a named process."""

    user_id: str
    role: str

    @classmethod
    def system(cls, process: str) -> Actor:
        """The actor of events a carelog process decides on its own (`system:<process>`)."""
        return cls(f"system:{process}", SYSTEM_ROLE)


ACTOR: ContextVar[Actor | None] = ContextVar("carelog_actor", default=None)
"""The actor of the request or event being handled, if any."""


@contextmanager
def correlated(correlation_id: str | None) -> Iterator[None]:
    """Every event created inside the block records `correlation_id`."""
    token = CORRELATION_ID.set(correlation_id)
    try:
        yield
    finally:
        CORRELATION_ID.reset(token)


@contextmanager
def acting_as(actor: Actor | None) -> Iterator[None]:
    """Every event created inside the block records `actor` as who caused it."""
    token = ACTOR.set(actor)
    try:
        yield
    finally:
        ACTOR.reset(token)


def actor_of(actor_id: str | None, actor_role: str | None, process: str) -> Actor:
    """The actor of an event a process decides: its cause's, else the process itself."""
    if actor_id and actor_role:
        return Actor(actor_id, actor_role)
    return Actor.system(process)


_IMMUTABLE = frozenset({str, int, float, bool, bytes, type(None), date, datetime, UUID, Decimal})
"""Value types an aggregate's copy shares with the original rather than copies."""


class TracedAggregate(Aggregate):
    """An aggregate whose events record the correlation id and actor they were caused under."""

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        """A copy to decide on (the command path copies the cached aggregate once per
        command): immutable values are shared, anything else is copied deeply. The same
        result as the generic deep copy, which rebuilt every date, time and id through
        pickling's protocol: about a tenth of an update's CPU in the command process."""
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        state = clone.__dict__
        for key, value in self.__dict__.items():
            kind = type(value)
            shared = kind in _IMMUTABLE or issubclass(kind, Enum)
            state[key] = value if shared else deepcopy(value, memo)
        return clone

    class Event(Aggregate.Event):
        correlation_id: str | None = field(default=None, kw_only=True)
        """The request or event that caused this one (None for events stored before it)."""
        actor_id: str | None = field(default=None, kw_only=True)
        """Who caused it: the user's id, or `system:<process>` (None for older events)."""
        actor_role: str | None = field(default=None, kw_only=True)
        """The role the actor acted in (None for events stored before it was recorded)."""

        def __post_init__(self) -> None:
            # Frozen dataclass: the documented way to set a field while initialising.
            if self.correlation_id is None:
                object.__setattr__(self, "correlation_id", CORRELATION_ID.get())
            if self.actor_id is None:
                actor = ACTOR.get()
                if actor is not None:
                    object.__setattr__(self, "actor_id", actor.user_id)
                    object.__setattr__(self, "actor_role", actor.role)

    class Created(Event, Aggregate.Created):
        pass
