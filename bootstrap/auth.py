"""The auth process: its Litestar app, wired from settings and served by uvicorn."""

from __future__ import annotations

from auth.app import create_app
from auth.config import AuthSettings
from runtime.http import serve
from runtime.settings import Settings


def run(settings: Settings, auth: AuthSettings) -> None:
    serve(create_app(settings, auth), settings.http_host, auth.port)
