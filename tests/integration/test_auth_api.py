"""The auth service against the real PostgreSQL: users, login, refresh rotation, logout, keys."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import psycopg
import pytest
from litestar.testing import AsyncTestClient

from auth.app import create_app
from auth.keys import KeyDirectoryError, add_key, promote
from auth.service import DEV_EMAIL, DEV_PASSWORD
from domain.roles import Role
from runtime.security import keys_from_jwks
from runtime.settings import Settings
from tests.support.stack import env_for, free_port
from tests.support.tokens import BAD_TOKEN_KINDS, TestTokens, auth_settings

pytestmark = pytest.mark.integration

STRONG = "correct horse battery staple"


def email() -> str:
    return f"user-{uuid.uuid4().hex[:12]}@example.org"


@pytest.fixture
async def client(settings: Settings, tokens: TestTokens) -> AsyncIterator[AsyncTestClient[Any]]:
    """The auth service, signing with the key the `tokens` fixture signs with."""
    async with AsyncTestClient(app=create_app(settings, tokens.settings)) as test_client:
        yield test_client


async def login(client: AsyncTestClient[Any], address: str, password: str) -> dict[str, Any]:
    response = await client.post("/auth/login", json={"email": address, "password": password})
    assert response.status_code == 200, response.text
    return response.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def new_user(
    client: AsyncTestClient[Any], tokens: TestTokens, role: Role = Role.CLINICIAN
) -> tuple[str, dict[str, Any]]:
    address = email()
    response = await client.post(
        "/auth/users",
        json={"email": address, "password": STRONG, "role": role.value},
        headers=tokens.headers(Role.ADMIN),
    )
    assert response.status_code == 201, response.text
    return address, response.json()


async def test_the_development_user_logs_in_and_gets_a_verifiable_token(client, tokens):
    session = await login(client, DEV_EMAIL, DEV_PASSWORD)
    assert set(session) == {"token", "refreshToken", "expiresIn", "tokenType"}
    assert session["expiresIn"] == tokens.settings.access_ttl_seconds
    jwks = (await client.get("/auth/.well-known/jwks.json")).json()
    header = jwt.get_unverified_header(session["token"])
    assert header["alg"] == "ES256"
    key = keys_from_jwks(jwks)[header["kid"]]
    claims = jwt.decode(
        session["token"],
        key,
        algorithms=["ES256"],
        audience=tokens.settings.audience,
        issuer=tokens.settings.issuer,
    )
    assert claims["role"] == "admin"
    assert claims["exp"] - claims["iat"] == tokens.settings.access_ttl_seconds
    assert "email" not in claims
    assert (await client.get("/auth/validate", headers=bearer(session["token"]))).status_code == 200


async def test_wrong_password_and_unknown_email_get_the_same_401(client, tokens):
    address, _ = await new_user(client, tokens)
    wrong = await client.post("/auth/login", json={"email": address, "password": "not it at all"})
    unknown = await client.post("/auth/login", json={"email": email(), "password": STRONG})
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert wrong.headers.get("content-type") == unknown.headers.get("content-type")


async def test_email_is_matched_in_any_case(client, tokens):
    address, _ = await new_user(client, tokens)
    await login(client, address.upper(), STRONG)


@pytest.mark.parametrize(
    ("password", "reason"),
    [
        ("short1!", "at least 12"),
        ("aaaaaaaaaaaaaaaa", "different characters"),
        ("password1234", "common"),
        ("{local}-is-my-password", "email"),
        ("x" * 200, "at most"),
    ],
)
async def test_weak_passwords_are_refused_with_400(client, tokens, password, reason):
    address = email()
    response = await client.post(
        "/auth/users",
        json={
            "email": address,
            "password": password.format(local=address.split("@")[0]),
            "role": "clinician",
        },
        headers=tokens.headers(Role.ADMIN),
    )
    assert response.status_code == 400
    assert reason in response.json()["errors"]["password"]


async def test_bad_user_input_is_400_and_a_taken_email_is_409(client, tokens):
    admin = tokens.headers(Role.ADMIN)
    bad_role = await client.post(
        "/auth/users", json={"email": email(), "password": STRONG, "role": "root"}, headers=admin
    )
    assert bad_role.status_code == 400
    bad_email = await client.post(
        "/auth/users", json={"email": "nope", "password": STRONG, "role": "analyst"}, headers=admin
    )
    assert bad_email.status_code == 400
    address, _ = await new_user(client, tokens)
    again = await client.post(
        "/auth/users",
        json={"email": address.upper(), "password": STRONG, "role": "analyst"},
        headers=admin,
    )
    assert again.status_code == 409


async def test_an_admin_lists_users_changes_a_role_and_disables_a_user(client, tokens):
    admin = tokens.headers(Role.ADMIN)
    address, user = await new_user(client, tokens, Role.RECEPTIONIST)
    listed = await client.get("/auth/users", params={"limit": 500}, headers=admin)
    assert listed.status_code == 200
    assert any(u["id"] == user["id"] and u["email"] == address for u in listed.json())
    assert all("password" not in str(u).lower() for u in listed.json())

    changed = await client.put(
        f"/auth/users/{user['id']}/role", json={"role": "analyst"}, headers=admin
    )
    assert changed.status_code == 200
    assert changed.json()["role"] == "analyst"
    session = await login(client, address, STRONG)
    assert jwt.decode(session["token"], options={"verify_signature": False})["role"] == "analyst"

    disabled = await client.post(f"/auth/users/{user['id']}/disable", headers=admin)
    assert disabled.status_code == 200
    assert disabled.json()["disabled"] is True
    refused = await client.post("/auth/login", json={"email": address, "password": STRONG})
    assert refused.status_code == 401
    gone = await client.post("/auth/refresh", json={"refreshToken": session["refreshToken"]})
    assert gone.status_code == 401
    invalid = await client.get("/auth/validate", headers=bearer(session["token"]))
    assert invalid.status_code == 401

    assert (await client.post(f"/auth/users/{user['id']}/enable", headers=admin)).status_code == 200
    await login(client, address, STRONG)
    missing = await client.post(f"/auth/users/{uuid.uuid4()}/disable", headers=admin)
    assert missing.status_code == 404


async def test_an_admin_cannot_lock_themselves_out(client, tokens):
    _, user = await new_user(client, tokens, Role.ADMIN)
    own = tokens.headers(Role.ADMIN, subject=user["id"])
    assert (await client.post(f"/auth/users/{user['id']}/disable", headers=own)).status_code == 409
    demote = await client.put(
        f"/auth/users/{user['id']}/role", json={"role": "analyst"}, headers=own
    )
    assert demote.status_code == 409


@pytest.mark.parametrize("role", [r for r in Role if r is not Role.ADMIN])
async def test_only_an_admin_manages_users(client, tokens, role):
    _, user = await new_user(client, tokens)
    headers = tokens.headers(role)
    calls = [
        client.post(
            "/auth/users",
            json={"email": email(), "password": STRONG, "role": "admin"},
            headers=headers,
        ),
        client.get("/auth/users", headers=headers),
        client.get(f"/auth/users/{user['id']}", headers=headers),
        client.put(f"/auth/users/{user['id']}/role", json={"role": "admin"}, headers=headers),
        client.post(f"/auth/users/{user['id']}/disable", headers=headers),
        client.post(f"/auth/users/{user['id']}/enable", headers=headers),
    ]
    for call in calls:
        assert (await call).status_code == 403


@pytest.mark.parametrize("kind", BAD_TOKEN_KINDS)
async def test_bad_tokens_are_401_at_the_auth_service(client, tokens, kind):
    headers = bearer(tokens.forged(kind))
    assert (await client.get("/auth/validate", headers=headers)).status_code == 401
    assert (await client.get("/auth/users", headers=headers)).status_code == 401


async def test_refresh_rotates_and_a_spent_token_revokes_its_family(client, tokens):
    address, _ = await new_user(client, tokens)
    first = await login(client, address, STRONG)
    second = await client.post("/auth/refresh", json={"refreshToken": first["refreshToken"]})
    assert second.status_code == 200
    rotated = second.json()
    assert rotated["refreshToken"] != first["refreshToken"]
    assert (await client.get("/auth/validate", headers=bearer(rotated["token"]))).status_code == 200

    reused = await client.post("/auth/refresh", json={"refreshToken": first["refreshToken"]})
    assert reused.status_code == 401
    # The thief's replay killed the family: the legitimate successor is dead too.
    successor = await client.post("/auth/refresh", json={"refreshToken": rotated["refreshToken"]})
    assert successor.status_code == 401
    # Other sessions of the same user live on.
    other = await login(client, address, STRONG)
    fine = await client.post("/auth/refresh", json={"refreshToken": other["refreshToken"]})
    assert fine.status_code == 200


async def test_racing_refreshes_of_one_token_let_at_most_one_win(client, tokens):
    address, _ = await new_user(client, tokens)
    session = await login(client, address, STRONG)
    responses = await asyncio.gather(
        *(
            client.post("/auth/refresh", json={"refreshToken": session["refreshToken"]})
            for _ in range(5)
        )
    )
    assert sorted(r.status_code for r in responses)[0] == 200
    assert sum(r.status_code == 200 for r in responses) == 1


async def test_unknown_refresh_tokens_are_401(client):
    response = await client.post("/auth/refresh", json={"refreshToken": "made-up"})
    assert response.status_code == 401


async def test_logout_kills_the_refresh_token(client, tokens):
    address, _ = await new_user(client, tokens)
    session = await login(client, address, STRONG)
    body = {"refreshToken": session["refreshToken"]}
    assert (await client.post("/auth/logout", json=body)).status_code == 401
    out = await client.post("/auth/logout", json=body, headers=bearer(session["token"]))
    assert out.status_code == 204
    assert (await client.post("/auth/refresh", json=body)).status_code == 401


async def test_logout_of_someone_elses_session_is_403(client, tokens):
    address, _ = await new_user(client, tokens)
    session = await login(client, address, STRONG)
    response = await client.post(
        "/auth/logout",
        json={"refreshToken": session["refreshToken"]},
        headers=tokens.headers(Role.ADMIN),
    )
    assert response.status_code == 403
    body = {"refreshToken": session["refreshToken"]}
    assert (await client.post("/auth/refresh", json=body)).status_code == 200


async def test_the_database_holds_only_hashes(client, tokens, settings):
    address, user = await new_user(client, tokens)
    session = await login(client, address, STRONG)
    async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
        row = await (
            await conn.execute(
                "SELECT password_hash FROM auth.users WHERE id = %s", [uuid.UUID(user["id"])]
            )
        ).fetchone()
        assert row[0].startswith("$argon2id$")
        assert STRONG not in row[0]
        tokens_stored = await (
            await conn.execute("SELECT token_hash FROM auth.refresh_tokens")
        ).fetchall()
    assert all(session["refreshToken"].encode() not in bytes(t[0]) for t in tokens_stored)


async def test_a_rotated_key_signs_new_tokens_and_old_ones_stay_valid(settings, tmp_path: Path):
    auth = auth_settings(tmp_path / "keys")
    async with AsyncTestClient(app=create_app(settings, auth)) as client:
        before = await login(client, DEV_EMAIL, DEV_PASSWORD)
        old_kid = jwt.get_unverified_header(before["token"])["kid"]
        new_kid = add_key(auth.keys_dir)
        published = (await client.get("/auth/.well-known/jwks.json")).json()
        assert {k["kid"] for k in published["keys"]} >= {old_kid, new_kid}
        promote(auth.keys_dir, new_kid)
        after = await login(client, DEV_EMAIL, DEV_PASSWORD)
        assert jwt.get_unverified_header(after["token"])["kid"] == new_kid
        for session in (before, after):
            valid = await client.get("/auth/validate", headers=bearer(session["token"]))
            assert valid.status_code == 200


def test_production_mode_refuses_to_start_without_a_key(settings, tmp_path: Path):
    (tmp_path / "keys").mkdir()
    env = {
        **env_for(settings.with_(env="production")),
        "CARELOG_AUTH_KEYS_DIR": str(tmp_path / "keys"),
        "CARELOG_JWKS_URL": "http://127.0.0.1:1/jwks.json",
        "CARELOG_AUTH_PORT": str(free_port()),
    }
    started = subprocess.run(
        [sys.executable, "-m", "bootstrap", "serve", "auth"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert started.returncode != 0
    assert "no signing key" in started.stdout + started.stderr
    assert KeyDirectoryError.__name__ in started.stdout + started.stderr


async def test_production_mode_has_no_development_user(settings, tokens):
    production = settings.with_(env="production")
    async with AsyncTestClient(app=create_app(production, tokens.settings)) as client:
        refused = await client.post(
            "/auth/login", json={"email": DEV_EMAIL, "password": DEV_PASSWORD}
        )
        assert refused.status_code == 401
    async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
        row = await (
            await conn.execute("SELECT count(*) FROM auth.users WHERE development_only")
        ).fetchone()
    assert row[0] == 0


async def test_health_and_metrics(client):
    ready = await client.get("/health/ready")
    assert ready.json() == {"status": "ready", "checks": {"database": "ok", "keys": "ok"}}
    await client.post("/auth/login", json={"email": email(), "password": STRONG})
    assert 'carelog_logins_total{outcome="refused"}' in (await client.get("/metrics")).text
