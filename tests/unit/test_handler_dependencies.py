"""No route takes more than one dependency: Litestar resolves two or more in a task
group on every request, which cost a write about a sixth of its CPU. Handlers read the
rest from the request (its scope, its app's state)."""

from __future__ import annotations

from auth.app import create_app as auth_app
from commands.api import create_app as commands_app
from read_api.app import create_app as read_app
from runtime.http import operations
from runtime.settings import Settings


def test_every_route_resolves_at_most_one_dependency(tokens):
    settings = Settings(
        env="development",
        database_url="postgresql://unused@127.0.0.1:1/none",
        redis_url="redis://127.0.0.1:1/0",
        kafka_bootstrap="127.0.0.1:1",
        jwks_url="http://127.0.0.1:1/unused",
    )
    apps = [
        commands_app(settings, verifier=tokens.verifier),
        read_app(settings, verifier=tokens.verifier),
        auth_app(settings, tokens.settings),
    ]
    seen = 0
    crowded = {}
    for app in apps:
        for method, path, handler in operations(app):
            used = set(handler.parsed_fn_signature.parameters) & set(handler.resolve_dependencies())
            seen += bool(used)
            if len(used) > 1:
                crowded[f"{method} {path}"] = sorted(used)
    assert seen > 20  # the check sees the routes that do take one
    assert crowded == {}
