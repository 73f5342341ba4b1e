"""The gateway's `/api-docs` page and the services' own Swagger pages, in a real headless
Chromium (Debian's `chromium`, driven by Playwright through `executable_path`).

- the page lists every OpenAPI document the gateway serves and renders each one's
  operations (method, path, summary);
- a call made from the page (Authorize with a bearer token, Try it out, Execute) shows
  the status and body the API gives for the same request;
- the page, and each service's `/schema/swagger`, load everything from their own server:
  any request to another host is recorded and refused, so a page that needs a CDN fails
  here as it would on a network without internet.

A gateway of this module's own (as in test_events_docs.py), in front of the stack's
services, whose tokens come from the stack's signing key.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, sync_playwright

from auth.tokens import issue_access_token
from bootstrap.gateway import write_config
from domain.roles import Role
from ops.gateway.generate import DOCS_ASSETS
from runtime.apidocs import ASSETS, assets_dir
from tests.e2e.test_gateway_limits import gateway_port, running_gateway
from tests.support.patients import body
from tests.support.stack import base_settings

CHROMIUM = shutil.which("chromium")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is installed by make install"),
]

RENDER_MS = 30_000
"""How long a page may take to render its operations (a bound, never a measurement)."""


@pytest.fixture(scope="module")
def docs_gateway(
    tmp_path_factory: pytest.TempPathFactory, signing_key: tuple[Any, Any]
) -> Iterator[str]:
    _, auth = signing_key
    base = base_settings()
    out = tmp_path_factory.mktemp("gateway")
    settings = base.with_(gateway_dir=str(out), gateway_port=gateway_port())
    config = write_config(settings, auth, base.jwks_url)
    with running_gateway(config, settings.gateway_port) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    try:
        yield context.new_page()
    finally:
        context.close()


def openapi_documents(gateway: str) -> dict[str, dict[str, Any]]:
    """The OpenAPI documents the gateway serves, by the names its page lists."""
    page = httpx.get(f"{gateway}/api-docs", timeout=10).text
    names = json.loads(page.split("const SERVICES = ", 1)[1].split(";", 1)[0])
    documents = {name: httpx.get(f"{gateway}/api-docs/{name}", timeout=10).json() for name in names}
    assert all("openapi" in document for document in documents.values())
    return documents


Operation = tuple[str, str, str, bool]
"""METHOD, path, summary, and whether it needs a token (Swagger UI shows a lock)."""


def operations(document: dict[str, Any]) -> set[Operation]:
    """The operations of an OpenAPI document."""
    return {
        (method.upper(), path, operation.get("summary", ""), bool(operation.get("security")))
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if isinstance(operation, dict) and "responses" in operation
    }


def rendered_operations(page: Page) -> set[Operation]:
    """The operations Swagger UI shows on the page."""
    page.locator(".opblock").first.wait_for(timeout=RENDER_MS)
    found = set()
    for block in page.locator(".opblock").all():
        method = block.locator(".opblock-summary-method").inner_text().strip()
        path = block.locator(".opblock-summary-path").get_attribute("data-path") or ""
        summary = block.locator(".opblock-summary-description")
        text = summary.inner_text().strip() if summary.count() else ""
        locked = block.locator(".authorization__btn").count() > 0
        found.add((method, path, text, locked))
    return found


def only_from(page: Page, origin: str) -> list[str]:
    """Refuses (and lists) every request of the page to anywhere but `origin`."""
    elsewhere: list[str] = []

    def check(route: Route) -> None:
        url = route.request.url
        parts = urlsplit(url)
        if (
            parts.scheme in ("http", "https", "ws", "wss")
            and f"{parts.scheme}://{parts.netloc}" != origin
        ):
            elsewhere.append(url)
            route.abort("blockedbyclient")
        else:
            route.continue_()

    page.route("**/*", check)
    return elsewhere


def test_the_page_renders_every_document_s_operations(docs_gateway, page):
    documents = openapi_documents(docs_gateway)
    assert {"patients", "auth"} <= set(documents)
    elsewhere = only_from(page, docs_gateway)
    page.goto(f"{docs_gateway}/api-docs")
    assert elsewhere == []
    listed = page.locator(".topbar select option").all_inner_texts()
    assert sorted(listed) == sorted(documents)
    for name, document in documents.items():
        page.goto(f"{docs_gateway}/api-docs?urls.primaryName={name}")
        page.locator(".info .title").filter(has_text=document["info"]["title"]).wait_for(
            timeout=RENDER_MS
        )
        assert rendered_operations(page) == operations(document), name
    assert elsewhere == []


def test_the_page_s_files_come_through_the_gateway_cacheable(docs_gateway):
    for name, media_type in ASSETS.items():
        served = httpx.get(f"{docs_gateway}{DOCS_ASSETS}/{name}", timeout=10)
        assert served.status_code == 200, name
        assert served.headers["content-type"].startswith(media_type)
        assert "immutable" in served.headers["cache-control"]
        assert served.content == (assets_dir() / name).read_bytes()
    for other in ("LICENSE", "swagger-editor-bundle.js"):
        assert httpx.get(f"{docs_gateway}{DOCS_ASSETS}/{other}", timeout=10).status_code == 404


def test_the_page_links_the_events_document(docs_gateway, page):
    page.goto(f"{docs_gateway}/api-docs")
    link = page.get_by_role("link", name="events (AsyncAPI)")
    assert link.get_attribute("href") == "/api-docs/events"


def test_a_call_made_from_the_page_shows_the_api_s_answer(docs_gateway, page, signing_key):
    key, auth = signing_key
    token = issue_access_token(key, str(uuid.uuid4()), Role.RECEPTIONIST, auth)
    headers = {"Authorization": f"Bearer {token}"}
    registered = httpx.post(
        f"{docs_gateway}/api/patients", json=body(), headers=headers, timeout=10
    )
    assert registered.status_code == 201, registered.text
    patient = registered.json()
    query = {"email": patient["email"], "minPosition": str(patient["position"])}

    elsewhere = only_from(page, docs_gateway)
    page.goto(f"{docs_gateway}/api-docs?urls.primaryName=patients")
    page.locator(".btn.authorize").click()
    page.locator(".auth-container input").fill(token)
    page.locator(".auth-btn-wrapper .btn.authorize").click()
    page.locator(".auth-btn-wrapper .btn-done").click()

    operation = (
        page.locator(".opblock")
        .filter(has=page.locator(".opblock-summary-path[data-path='/api/patients']"))
        .filter(has=page.locator(".opblock-summary-method", has_text="GET"))
    )
    operation.locator(".opblock-summary").click()
    roles = operation.locator("tr", has_text="x-required-roles").inner_text()
    assert Role.RECEPTIONIST.value in roles and Role.ANALYST.value in roles
    operation.locator(".try-out__btn").click()
    for name, value in query.items():
        operation.locator(f"tr[data-param-name='{name}'] input").fill(value)
    with page.expect_request(lambda r: urlsplit(r.url).path == "/api/patients") as sent:
        operation.locator(".btn.execute").click()
    shown = operation.locator(".live-responses-table .response")
    shown.locator(".response-col_status").wait_for(timeout=RENDER_MS)
    status = int(shown.locator(".response-col_status").inner_text().strip())
    shown_body = json.loads(shown.locator(".response-col_description pre").first.inner_text())

    request = sent.value
    assert request.headers["authorization"] == f"Bearer {token}"
    assert request.url.startswith(f"{docs_gateway}/api/patients?")
    answer = httpx.get(f"{docs_gateway}/api/patients", params=query, headers=headers, timeout=10)
    assert answer.status_code == 200, answer.text
    assert (status, shown_body) == (answer.status_code, answer.json())
    assert [p["id"] for p in shown_body["patients"]] == [patient["id"]]
    assert elsewhere == []


@pytest.mark.parametrize("service", ["auth", "read-api", "commands"])
def test_a_service_s_swagger_page_loads_nothing_from_elsewhere(service, page):
    settings = base_settings()
    origin = f"http://{settings.upstream(service)}:{settings.ports[service]}"
    elsewhere = only_from(page, origin)
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto(f"{origin}/schema/swagger")  # returns once the page and its scripts loaded
    assert elsewhere == []
    assert failed == []
    document = httpx.get(f"{origin}/schema/openapi.json", timeout=10).json()
    assert rendered_operations(page) == operations(document)
