"""The identity context's errors; auth/app.py maps each to a status in one place."""

from __future__ import annotations

from collections.abc import Mapping


class AuthError(Exception):
    """Base class of every expected, client-caused failure of the auth service."""


class InvalidInput(AuthError):
    """One or more fields are invalid; `errors` maps each field to what is wrong."""

    def __init__(self, errors: Mapping[str, str]):
        self.errors = dict(errors)
        super().__init__("; ".join(f"{k}: {v}" for k, v in self.errors.items()))


class InvalidCredentials(AuthError):
    """Unknown email, wrong password or disabled user: one answer for all three."""


class InvalidRefreshToken(AuthError):
    """The refresh token is unknown, expired, spent or revoked."""


class UserNotFound(AuthError):
    """No user has this id."""


class EmailTaken(AuthError):
    """Another user already has this email address."""


class NotYourToken(AuthError):
    """The refresh token belongs to another user than the access token's."""


class SelfLockout(AuthError):
    """An admin may not disable or demote themselves."""


class Busy(AuthError):
    """Too many password checks are already queued; retry shortly."""
