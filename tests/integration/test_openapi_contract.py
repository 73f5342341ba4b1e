"""Each service's OpenAPI document says what its wire does, operation by operation.

The documents are the ones the services serve (`/schema/openapi.json`) and the gateway
publishes (`/api-docs/<name>`). The guards, route options and structs they are built
from are the ones requests meet, so these tests hold the document to them: every
guarded operation (parameterised paths included) names bearer security and its roles,
every error is the one problem+json schema, bodies are named schemas with formats and
limits, and the headers writes read and answer are described. tests/security/test_fuzz.py
then checks the answers themselves against the documents.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from litestar import Litestar
from litestar.testing import TestClient

from auth.app import create_app as auth_app
from bootstrap.gateway import api_documents
from commands.api import PatientInput
from commands.api import create_app as commands_app
from domain.patients import ADDRESS_MAX, EMAIL_MAX, NAME_MAX
from read_api.app import PatientView
from read_api.app import create_app as read_app
from readmodels.directory import PatientRow
from runtime.http import PROBLEM, PROBLEM_MEDIA
from runtime.security import role_matrix
from runtime.settings import Settings
from tests.support.tokens import TestTokens

pytestmark = pytest.mark.integration

DOCS_PAGE = Path(__file__).resolve().parents[2] / "ops" / "gateway" / "docs.html"
UNLISTED = ("/health", "/metrics", "/schema")
"""Routes outside every published document."""
METHODS = {"get", "put", "post", "delete", "patch"}


def unused_settings() -> Settings:
    """Settings whose servers are never reached: building an app and its document connects
    to nothing (startup does, and these tests do not start the apps)."""
    return Settings(
        env="development",
        database_url="postgresql://unused@127.0.0.1:1/none",
        redis_url="redis://127.0.0.1:1/0",
        kafka_bootstrap="127.0.0.1:1",
        jwks_url="http://127.0.0.1:1/unused",
    )


@pytest.fixture(scope="module")
def apps(tokens: TestTokens) -> dict[str, Litestar]:
    settings = unused_settings()
    return {
        "commands": commands_app(settings, verifier=tokens.verifier),
        "queries": read_app(settings, verifier=tokens.verifier),
        "auth": auth_app(settings, tokens.settings),
    }


def served(app: Litestar) -> dict[str, Any]:
    """The document as the app serves it (no lifespan: serving it needs no database)."""
    client = TestClient(app)
    response = client.get("/schema/openapi.json")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


@pytest.fixture(scope="module")
def documents(apps: dict[str, Litestar]) -> dict[str, dict[str, Any]]:
    return {name: served(app) for name, app in apps.items()}


@pytest.fixture(scope="module")
def gateway_documents(tokens: TestTokens) -> dict[str, dict[str, Any]]:
    return api_documents(unused_settings(), tokens.settings)


def each_operation(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield method, path, operation


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    name = ref.removeprefix("#/components/schemas/")
    resolved: dict[str, Any] = document["components"]["schemas"][name]
    return resolved


def body_of(operation: dict[str, Any], status: str) -> dict[str, Any]:
    schema: dict[str, Any] = operation["responses"][status]["content"]["application/json"]["schema"]
    return schema


@pytest.mark.parametrize("name", ["commands", "queries", "auth"])
def test_every_guarded_operation_names_bearer_security_and_its_roles(apps, documents, name):
    document = documents[name]
    matrix = {
        (method, path): roles
        for (method, path), roles in role_matrix(apps[name]).items()
        if not path.startswith(UNLISTED)
    }
    assert matrix
    documented = {(m.upper(), p) for m, p, _ in each_operation(document)}
    assert documented == set(matrix), "the document and the routes name other operations"
    for (method, path), roles in matrix.items():
        operation = document["paths"][path][method.lower()]
        where = f"{method} {path}"
        if roles is None:
            assert not operation.get("security"), where
            assert "x-required-roles" not in operation, where
            continue
        assert operation["security"] == [{"bearer": []}], where
        assert operation["x-required-roles"] == sorted(r.value for r in roles), where
        assert {"401", "403"} <= set(operation["responses"]), where
        for role in roles:
            assert role.value in operation["description"], where
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}


def test_parameterised_guarded_paths_are_keyed_as_the_document_writes_them(apps):
    matrix = role_matrix(apps["commands"]) | role_matrix(apps["queries"])
    for method in ("GET", "PUT", "DELETE"):
        assert matrix[(method, "/patients/{patient_id}")], method
    users = role_matrix(apps["auth"])
    for method, path in [
        ("GET", "/auth/users/{user_id}"),
        ("PUT", "/auth/users/{user_id}/role"),
        ("POST", "/auth/users/{user_id}/disable"),
        ("POST", "/auth/users/{user_id}/enable"),
    ]:
        assert users[(method, path)], path


def public_on_the_docs_page(operation: dict[str, Any]) -> bool:
    """What ops/gateway/docs.html (Swagger UI) shows as "public": no lock (no security) and
    no `x-required-roles` extension (tests/e2e/test_docs_page.py sees both in a browser)."""
    return not operation.get("x-required-roles") and not operation.get("security")


def test_no_guarded_operation_is_public_on_the_gateway_docs_page(apps, gateway_documents):
    assert "showExtensions: true" in DOCS_PAGE.read_text()
    guarded = {
        (method.lower(), prefix + path): roles
        for app, prefix in (
            (apps["commands"], "/api"),
            (apps["queries"], "/api"),
            (apps["auth"], ""),
        )
        for (method, path), roles in role_matrix(app).items()
        if roles is not None
    }
    seen = set()
    for document in gateway_documents.values():
        if "openapi" not in document:
            continue  # the events' AsyncAPI document has no HTTP operations
        for method, path, operation in each_operation(document):
            roles = guarded.get((method, path))
            if roles is None:
                assert public_on_the_docs_page(operation), f"{method} {path}"
                continue
            seen.add((method, path))
            assert not public_on_the_docs_page(operation), f"{method} {path} shown as public"
            assert operation["x-required-roles"] == sorted(r.value for r in roles)
            assert "429" in operation["responses"], f"{method} {path}: the gateway's rate limit"
    assert seen == set(guarded)


@pytest.mark.parametrize("name", ["commands", "queries", "auth"])
def test_every_error_answer_is_the_one_problem_schema(documents, name):
    document = documents[name]
    problem = document["components"]["schemas"][PROBLEM]
    assert problem["required"] == ["status", "detail"]
    assert problem["properties"]["errors"]["additionalProperties"] == {"type": "string"}
    for method, path, operation in each_operation(document):
        statuses = set(operation["responses"])
        assert {"400", "503"} <= statuses, f"{method} {path}"
        if method in ("post", "put"):
            assert {"413", "415"} <= statuses, f"{method} {path}"
        for status, answer in operation["responses"].items():
            if int(status) < 400:
                continue
            assert answer["content"] == {
                PROBLEM_MEDIA: {"schema": {"$ref": f"#/components/schemas/{PROBLEM}"}}
            }, f"{method} {path} {status}"
        if "503" in operation["responses"]:
            assert "Retry-After" in operation["responses"]["503"]["headers"]


def test_patient_operations_answer_named_schemas_with_formats(documents, gateway_documents):
    for document, prefix in ((documents["queries"], ""), (gateway_documents["patients"], "/api")):
        assert document["components"]["schemas"]
        one = prefix + "/patients/{patient_id}"
        page = body_of(document["paths"][prefix + "/patients"]["get"], "200")
        assert page == {"$ref": "#/components/schemas/PatientPage"}
        items = resolve(document, page)["properties"]["patients"]["items"]
        assert items == {"$ref": "#/components/schemas/PatientView"}
        assert body_of(document["paths"][one]["get"], "200") == items
        patient = resolve(document, items)["properties"]
        assert patient["id"]["format"] == "uuid"
        assert patient["email"]["format"] == "email"
        assert patient["dateOfBirth"]["format"] == "date"
        assert patient["registeredDate"] == {**patient["registeredDate"], "format": "date"}
        assert "ETag" in document["paths"][one]["get"]["responses"]["200"]["headers"]
        assert "404" in document["paths"][one]["get"]["responses"]
    writes = documents["commands"]["paths"]
    for operation, status in (
        (writes["/patients"]["post"], "201"),
        (writes["/patients/{patient_id}"]["put"], "200"),
    ):
        written = resolve(documents["commands"], body_of(operation, status))
        assert body_of(operation, status) == {"$ref": "#/components/schemas/PatientOut"}
        assert written["properties"]["id"]["format"] == "uuid"
        assert written["properties"]["email"]["format"] == "email"


def test_the_query_api_documents_the_fields_its_patient_rows_carry():
    # PatientView describes what is encoded from PatientRow: the same fields on the wire.
    assert PatientView.__struct_encode_fields__ == PatientRow.__struct_encode_fields__


def test_request_limits_come_from_the_struct_the_body_is_decoded_with(documents):
    document = documents["commands"]
    body = document["paths"]["/patients"]["post"]["requestBody"]["content"]["application/json"]
    fields = resolve(document, body["schema"])["properties"]
    assert set(fields) == set(PatientInput.__struct_encode_fields__)
    assert fields["name"]["maxLength"] == NAME_MAX
    assert fields["address"]["maxLength"] == ADDRESS_MAX
    assert fields["email"]["maxLength"] == EMAIL_MAX
    assert fields["email"]["format"] == "email"


def test_writes_describe_the_headers_they_read_and_answer(documents):
    paths = documents["commands"]["paths"]
    created = paths["/patients"]["post"]["responses"]["201"]["headers"]
    assert {"ETag", "Event-Position", "Location"} <= set(created)
    for method in ("put", "delete"):
        operation = paths["/patients/{patient_id}"][method]
        headers = {p["name"] for p in operation["parameters"] if p["in"] == "header"}
        assert "If-Match" in headers, method
        assert {"404", "409", "412"} <= set(operation["responses"]), method
        success = next(a for s, a in operation["responses"].items() if s.startswith("2"))
        assert {"ETag", "Event-Position"} <= set(success["headers"]), method
    conflict = paths["/patients"]["post"]["responses"]
    assert "409" in conflict
    assert "400" in conflict


def test_login_documents_its_401_and_the_auth_users_their_404(documents):
    paths = documents["auth"]["paths"]
    assert "401" in paths["/auth/login"]["post"]["responses"]
    assert not paths["/auth/login"]["post"].get("security")
    assert "404" in paths["/auth/users/{user_id}"]["get"]["responses"]
    user = resolve(documents["auth"], body_of(paths["/auth/users/{user_id}"]["get"], "200"))
    assert user["properties"]["id"]["format"] == "uuid"
    assert user["properties"]["email"]["format"] == "email"
