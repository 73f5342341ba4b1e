"""The HTTP services' apps, built offline (nothing reachable), for tests of their routes."""

from __future__ import annotations

from litestar import Litestar

from auth.app import create_app as auth_app
from commands.api import create_app as commands_app
from read_api.app import create_app as read_app
from runtime.settings import Settings
from tests.support.tokens import TestTokens

OFFLINE = Settings(
    env="development",
    database_url="postgresql://unused@127.0.0.1:1/none",
    redis_url="redis://127.0.0.1:1/0",
    kafka_bootstrap="127.0.0.1:1",
    jwks_url="http://127.0.0.1:1/unused",
)
"""Settings whose every dependency is unreachable: for building apps and configs only."""


def offline_apps(tokens: TestTokens) -> list[tuple[Litestar, str]]:
    """Each service's app with the path prefix the gateway gives its routes."""
    return [
        (commands_app(OFFLINE, verifier=tokens.verifier), "/api"),
        (read_app(OFFLINE, verifier=tokens.verifier), "/api"),
        (auth_app(OFFLINE, tokens.settings), ""),
    ]
