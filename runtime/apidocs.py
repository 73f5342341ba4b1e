"""The API docs pages' scripts, served from this project's own files: never from a CDN.

Swagger UI comes bundled in the `swagger-ui-py` package (its `static/` folder, the
swagger-ui dist). Every service serves the few files a page needs under
`/schema/assets/<version>/` (`ASSETS_PATH`), cacheable for a year since the version is
in the path; its own Swagger page (`/schema/swagger`, also `/schema`) loads them from
there, and the gateway's `/api-docs` page loads the same files as
`/api-docs/assets/<version>/`, which the gateway sends to the services. So a docs page
works on a network without internet.

`render_plugins()` is what a service's `/schema` offers: Swagger UI, `openapi.json` and
`openapi.yaml`. Litestar's other pages (ReDoc, RapiDoc, Stoplight Elements) load their
scripts from a CDN only, so they are not offered.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Any

from litestar import Router, get
from litestar.datastructures import CacheControlHeader
from litestar.exceptions import NotFoundException
from litestar.openapi.plugins import (
    JsonRenderPlugin,
    OpenAPIRenderPlugin,
    SwaggerRenderPlugin,
    YamlRenderPlugin,
)
from litestar.response import File

SWAGGER_UI_VERSION = importlib.metadata.version("swagger-ui-py")
"""The version of the package that bundles Swagger UI; part of the assets' path."""

ASSETS_PATH = f"/schema/assets/{SWAGGER_UI_VERSION}"
"""Where each service serves the docs pages' files."""

ASSETS: dict[str, str] = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-standalone-preset.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon-32x32.png": "image/png",
}
"""The files a docs page loads, and their media types; no other file is served."""

CACHE = CacheControlHeader(public=True, max_age=365 * 24 * 3600, immutable=True)


def assets_dir() -> Path:
    """The Swagger UI dist inside the installed `swagger-ui-py` package."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or spec.origin is None:
        raise RuntimeError("the swagger-ui-py package is not installed (uv sync)")
    return Path(spec.origin).parent / "static"


@get(
    f"/assets/{SWAGGER_UI_VERSION}/{{name:str}}",
    include_in_schema=False,
    sync_to_thread=False,
    cache_control=CACHE,
)
def asset(name: str) -> File:
    """One of the docs pages' files (404 for any other name)."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise NotFoundException(f"no such asset: {name}")
    return File(
        path=assets_dir() / name,
        media_type=media_type,
        content_disposition_type="inline",
        filename=name,
    )


FAVICON = f"<link rel='icon' type='image/png' href='{ASSETS_PATH}/favicon-32x32.png'>"


class BundledSwagger(SwaggerRenderPlugin):
    """Litestar's Swagger UI page with the bundled files, which it also serves."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
            css_url=f"{ASSETS_PATH}/swagger-ui.css",
            standalone_preset_js_url=f"{ASSETS_PATH}/swagger-ui-standalone-preset.js",
            favicon=FAVICON,
            **kwargs,
        )

    def receive_router(self, router: Router) -> None:
        super().receive_router(router)  # oauth2-redirect.html
        router.register(asset)


def render_plugins() -> list[OpenAPIRenderPlugin]:
    """A service's `/schema` pages: Swagger UI (also at `/schema` itself) and the document."""
    return [
        BundledSwagger(),
        JsonRenderPlugin(favicon=FAVICON),
        YamlRenderPlugin(favicon=FAVICON),
    ]
