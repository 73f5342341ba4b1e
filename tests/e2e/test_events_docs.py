"""The topics' AsyncAPI document through a gateway: `/api-docs/events`, listed on the docs page.

A gateway of this module's own (HAProxy with a config rendered by `carelog
gateway-config`'s code into a temporary directory, on free ports, trusting the stack's
keys), so the stack's gateway is never reloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bootstrap.asyncapi import document
from bootstrap.cli import ASYNCAPI_FILE, SCHEMAS_DIR
from bootstrap.gateway import write_config
from tests.e2e.test_gateway_limits import gateway_port, running_gateway
from tests.support.stack import base_settings

pytestmark = pytest.mark.e2e


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


def test_the_events_document_is_served_as_committed(docs_gateway):
    response = httpx.get(f"{docs_gateway}/api-docs/events", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    served = response.json()
    assert served["asyncapi"] == "3.0.0"
    assert served == document()
    assert served == json.loads((SCHEMAS_DIR / ASYNCAPI_FILE).read_text())


def test_the_docs_page_lists_the_events_document(docs_gateway):
    page = httpx.get(f"{docs_gateway}/api-docs", timeout=10)
    assert page.status_code == 200
    assert "events (AsyncAPI)" in page.text
    assert '"events"' in page.text
    assert httpx.get(f"{docs_gateway}/api-docs/event", timeout=10).status_code == 404
