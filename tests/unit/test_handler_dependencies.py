"""No route takes more than one dependency: Litestar resolves two or more in a task
group on every request, which cost a write about a sixth of its CPU. Handlers read the
rest from the request (its scope, its app's state)."""

from __future__ import annotations

from runtime.http import operations
from tests.support.apps import offline_apps


def test_every_route_resolves_at_most_one_dependency(tokens):
    seen = 0
    crowded = {}
    for app, _ in offline_apps(tokens):
        for method, path, handler in operations(app):
            used = set(handler.parsed_fn_signature.parameters) & set(handler.resolve_dependencies())
            seen += bool(used)
            if len(used) > 1:
                crowded[f"{method} {path}"] = sorted(used)
    assert seen > 20  # the check sees the routes that do take one
    assert crowded == {}
