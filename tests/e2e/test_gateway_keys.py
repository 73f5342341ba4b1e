"""Key rotation on the running stack: nobody is logged out, new tokens use the new key."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import jwt
import pytest

from domain.roles import Role
from tests.e2e.conftest import PASSWORD, login, new_user
from tests.support.stack import ROOT

pytestmark = pytest.mark.e2e


async def test_rotating_the_signing_key_keeps_old_tokens_valid(gateway, admin):
    user = await new_user(gateway, admin, Role.CLINICIAN)
    old_kid = jwt.get_unverified_header(user.token)["kid"]

    rotated = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "bootstrap", "keys", "rotate"],
        cwd=ROOT,
        env={**os.environ, "CARELOG_ENV": "development"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert rotated.returncode == 0, rotated.stdout + rotated.stderr
    assert "haproxy reloaded" in rotated.stdout

    fresh = await login(gateway, user.email, PASSWORD)
    new_kid = jwt.get_unverified_header(fresh["token"])["kid"]
    assert new_kid != old_kid
    published = (await gateway.get("/auth/.well-known/jwks.json")).json()
    assert {old_kid, new_kid} <= {key["kid"] for key in published["keys"]}
    for token in (user.token, fresh["token"]):
        headers = {"Authorization": f"Bearer {token}"}
        # the gateway, the query API, the command API and the auth service all accept both
        assert (await gateway.get("/api/patients", headers=headers)).status_code == 200
        assert (
            await gateway.delete(f"/api/patients/{user.id}", headers=headers)
        ).status_code == 404
        assert (await gateway.get("/auth/validate", headers=headers)).status_code == 200
