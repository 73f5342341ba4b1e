"""The relay decodes only what it publishes: stored topics are judged by their class."""

from __future__ import annotations

from eventsourcing.utils import get_topic

from commands.relay import published
from domain.contracts import CONTRACTS
from domain.patients import EmailClaim, Patient


def test_published_events_are_exactly_the_contracted_ones():
    assert published(get_topic(Patient.Registered))
    assert all(published(get_topic(event_class)) for event_class in CONTRACTS)
    internal = [c for c in vars(EmailClaim).values() if isinstance(c, type)]
    assert internal
    assert not any(published(get_topic(event_class)) for event_class in internal)
