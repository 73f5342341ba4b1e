"""The auth process: its Litestar app, wired from settings and served by Granian."""

from __future__ import annotations

from litestar import Litestar

from auth.app import create_app
from auth.config import AuthSettings
from runtime.http import serve, served
from runtime.settings import Settings


def worker() -> Litestar:
    """One worker process's app: `serve` has each worker import and call this."""
    from bootstrap.cli import auth_settings, worker_settings

    return served(create_app(worker_settings("auth"), auth_settings("auth")))


def run(settings: Settings, auth: AuthSettings) -> None:
    serve("bootstrap.auth:worker", settings.http_host, auth.port, settings.auth_workers)
