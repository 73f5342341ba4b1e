"""The read-api process: its Litestar app, wired from settings and served by Granian."""

from __future__ import annotations

from litestar import Litestar

from read_api.app import create_app
from runtime.http import serve, served
from runtime.security import with_verifier
from runtime.settings import Settings


def app(settings: Settings) -> Litestar:
    """The app, checking tokens against the auth service's JWKS and revocations."""
    return with_verifier(create_app, settings)


def worker() -> Litestar:
    """One worker process's app: `serve` has each worker import and call this."""
    from bootstrap.cli import worker_settings

    return served(app(worker_settings("read-api")))


def run(settings: Settings) -> None:
    serve(
        "bootstrap.read_api:worker",
        settings.http_host,
        settings.ports["read-api"],
        settings.read_api_workers,
    )
