"""A service's own docs pages: Swagger UI whose files the service serves itself (no CDN)."""

from __future__ import annotations

import re

from litestar import get
from litestar.testing import TestClient

from runtime.apidocs import ASSETS, ASSETS_PATH, assets_dir
from runtime.http import service_app


@get("/things", summary="List things", sync_to_thread=False)
def things() -> list[str]:
    return []


def app():
    return service_app("docs-test", [things], title="things", description="Things.")


def test_the_swagger_page_loads_only_the_service_s_own_files():
    with TestClient(app()) as client:
        for path in ("/schema", "/schema/swagger"):
            page = client.get(path)
            assert page.status_code == 200
            assert "SwaggerUIBundle(" in page.text
            urls = re.findall(r"(?:src|href)=['\"]([^'\"]*)['\"]", page.text)
            assert sorted(urls) == sorted(
                f"{ASSETS_PATH}/{name}"
                for name in (
                    "favicon-32x32.png",
                    "swagger-ui.css",
                    "swagger-ui-bundle.js",
                    "swagger-ui-standalone-preset.js",
                )
            )
            for url in urls:
                asset = client.get(url)
                assert asset.status_code == 200, url
                assert asset.content == (assets_dir() / url.rsplit("/", 1)[1]).read_bytes()


def test_the_assets_are_cacheable_and_no_other_file_is_served():
    with TestClient(app()) as client:
        for name, media_type in ASSETS.items():
            asset = client.get(f"{ASSETS_PATH}/{name}")
            assert asset.status_code == 200
            assert asset.headers["content-type"].startswith(media_type)
            assert "immutable" in asset.headers["cache-control"]
        for other in ("swagger-editor-bundle.js", "LICENSE", "..%2F__init__.py", "index.html"):
            refused = client.get(f"{ASSETS_PATH}/{other}")
            assert refused.status_code == 404, other
            assert refused.headers["content-type"] == "application/problem+json"
        assert client.get("/schema/assets/0.0.1/swagger-ui.css").status_code == 404


def test_only_pages_that_need_no_cdn_are_offered():
    with TestClient(app()) as client:
        for cdn_only in ("redoc", "rapidoc", "elements"):
            assert client.get(f"/schema/{cdn_only}").status_code == 404
        assert client.get("/schema/openapi.json").json()["paths"]["/things"]["get"]["summary"] == (
            "List things"
        )
        assert client.get("/schema/openapi.yaml").status_code == 200
