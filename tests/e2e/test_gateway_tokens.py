"""Every kind of bad token is 401 at the gateway, before any service sees it."""

from __future__ import annotations

import pytest

from tests.support.patients import body
from tests.support.tokens import BAD_TOKEN_KINDS, bad_token

pytestmark = pytest.mark.e2e

REFUSED_AT_THE_GATEWAY = "a valid bearer token is required"
PROTECTED = [
    ("GET", "/api/patients"),
    ("POST", "/api/patients"),
    ("GET", "/auth/users"),
    ("GET", "/auth/validate"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_a_missing_token_is_401_with_a_challenge(gateway, method, path):
    response = await gateway.request(method, path, json=body() if method == "POST" else None)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["detail"] == REFUSED_AT_THE_GATEWAY


@pytest.mark.parametrize("kind", BAD_TOKEN_KINDS)
@pytest.mark.parametrize(("method", "path"), PROTECTED)
async def test_a_bad_token_is_401(gateway, signing_key, kind, method, path):
    key, auth = signing_key
    headers = {"Authorization": f"Bearer {bad_token(kind, key, auth)}"}
    response = await gateway.request(
        method, path, json=body() if method == "POST" else None, headers=headers
    )
    assert response.status_code == 401, (kind, response.text)
    if kind != "unknown-role":  # the signature and claims are the gateway's to check
        assert response.json()["detail"] == REFUSED_AT_THE_GATEWAY, kind


async def test_a_basic_scheme_is_not_a_bearer_token(gateway, admin):
    headers = {"Authorization": admin.headers["Authorization"].replace("Bearer", "Basic")}
    assert (await gateway.get("/api/patients", headers=headers)).status_code == 401
