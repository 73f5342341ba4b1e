"""The patient context's errors. The services map each to a status in one place."""

from __future__ import annotations

from collections.abc import Mapping


class DomainError(Exception):
    """Base class of every expected, client-caused failure."""


class InvalidData(DomainError):
    """One or more fields are invalid; `errors` maps each field to what is wrong."""

    def __init__(self, errors: Mapping[str, str]):
        self.errors = dict(errors)
        super().__init__("; ".join(f"{k}: {v}" for k, v in self.errors.items()))


class PatientNotFound(DomainError):
    """No current patient has this id (never registered, or removed)."""


class PatientErased(DomainError):
    """The patient was erased: their personal data is gone for good (410 Gone)."""


class EmailTaken(DomainError):
    """Another current patient already uses this email address."""


class StaleVersion(DomainError):
    """The caller's expected version is not the aggregate's current version."""

    def __init__(self, expected: int, actual: int):
        self.expected = expected
        self.actual = actual
        super().__init__(f"expected version {expected}, current version is {actual}")
