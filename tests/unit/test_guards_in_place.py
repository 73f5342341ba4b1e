"""Guards see the route handler itself, not a copy made for each request, and still
refuse what they refuse."""

from __future__ import annotations

from typing import Any

from litestar import get
from litestar.connection import ASGIConnection
from litestar.exceptions import PermissionDeniedException
from litestar.handlers import BaseRouteHandler
from litestar.testing import TestClient

from runtime.http import operations, service_app

seen: list[BaseRouteHandler] = []


async def recording(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    seen.append(handler)
    if connection.headers.get("x-let-in") != "yes":
        raise PermissionDeniedException("not you")


def sync_recording(
    connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
) -> None:
    seen.append(handler)


@get("/guarded", guards=[recording, sync_recording], sync_to_thread=False)
def guarded() -> dict[str, str]:
    return {"ok": "yes"}


def test_guards_get_the_registered_handler_and_refuse_as_before() -> None:
    app = service_app("guards", [guarded], title="t", description="t")
    [registered] = [h for _, path, h in operations(app) if path == "/guarded"]
    seen.clear()
    with TestClient(app) as client:
        assert client.get("/guarded", headers={"x-let-in": "yes"}).json() == {"ok": "yes"}
        assert client.get("/guarded", headers={"x-let-in": "yes"}).status_code == 200
        refused = client.get("/guarded")
    assert refused.status_code == 403
    # Both guards ran for each admitted request (the sync one too), the async one alone
    # for the refused; each time with the handler the app registered, never a copy.
    assert len(seen) == 5
    assert all(handler is registered for handler in seen)
