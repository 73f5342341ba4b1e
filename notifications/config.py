"""The notifier's settings, read from the environment when it starts.

CARELOG_SMTP_HOST, CARELOG_SMTP_PORT   the SMTP server (127.0.0.1:1025, the local capture)
CARELOG_SMTP_USERNAME, _PASSWORD      authentication (none by default)
CARELOG_SMTP_STARTTLS                 upgrade to TLS before authenticating (false)
CARELOG_MAIL_FROM                     the sender (carelog <no-reply@carelog.invalid>)
CARELOG_PRACTICE_NAME                 how messages name the practice (the practice)
CARELOG_NOTIFY_MAX_AGE_HOURS          events older than this send nothing (24)
(Health and metrics on CARELOG_NOTIFIER_PORT, 4015: see runtime.settings.)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated

import msgspec

from runtime.settings import Port, load


class NotifierConfig(msgspec.Struct, frozen=True, kw_only=True):
    smtp_host: str = "127.0.0.1"
    smtp_port: Port = 1025
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False
    mail_from: str = "carelog <no-reply@carelog.invalid>"
    practice_name: str = "the practice"
    max_attempts: Annotated[int, msgspec.Meta(ge=1, le=50)] = 8
    """Attempts before a temporary failure is given up."""
    first_retry_seconds: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    max_retry_seconds: Annotated[float, msgspec.Meta(gt=0)] = 600.0
    reminder_hours: Annotated[int, msgspec.Meta(ge=1, le=168)] = 24
    max_age_hours: Annotated[float, msgspec.Meta(gt=0)] = 24.0
    """Events older than this send nothing (a first start over a long history greets
    nobody twice-late)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NotifierConfig:
        return load(cls, os.environ if environ is None else environ, _NAMES)


_NAMES = {
    "smtp_host": "CARELOG_SMTP_HOST",
    "smtp_port": "CARELOG_SMTP_PORT",
    "smtp_username": "CARELOG_SMTP_USERNAME",
    "smtp_password": "CARELOG_SMTP_PASSWORD",
    "smtp_starttls": "CARELOG_SMTP_STARTTLS",
    "mail_from": "CARELOG_MAIL_FROM",
    "practice_name": "CARELOG_PRACTICE_NAME",
    "max_age_hours": "CARELOG_NOTIFY_MAX_AGE_HOURS",
}
