"""The read-api process: its Litestar app, wired from settings and served by uvicorn."""

from __future__ import annotations

from litestar import Litestar

from read_api.app import create_app
from runtime.http import serve
from runtime.security import TokenVerifier
from runtime.settings import Settings


def app(settings: Settings) -> Litestar:
    """The app, checking tokens against the auth service's JWKS."""
    return create_app(settings, verifier=TokenVerifier.from_settings(settings))


def run(settings: Settings) -> None:
    serve(app(settings), settings.http_host, settings.ports["read-api"])
