"""Access tokens: what the verifier accepts, everything it refuses, and key rings."""

from __future__ import annotations

import time
from pathlib import Path

import jwt
import pytest

from auth.keys import KeyRing, add_key, promote, prune
from auth.tokens import issue_access_token
from domain.roles import Role
from runtime.security import LEEWAY_SECONDS, InvalidToken, keys_from_jwks
from tests.support.tokens import BAD_TOKEN_KINDS, auth_settings


@pytest.mark.parametrize("role", list(Role))
async def test_a_token_it_issued_verifies_with_its_subject_and_role(tokens, role):
    claims = await tokens.verifier.verify(tokens.token(role, subject="user-1"))
    assert (claims.subject, claims.role) == ("user-1", role)
    assert claims.expires_at > time.time()


@pytest.mark.parametrize("kind", BAD_TOKEN_KINDS)
async def test_every_kind_of_bad_token_is_refused(tokens, kind):
    with pytest.raises(InvalidToken):
        await tokens.verifier.verify(tokens.forged(kind))


class FakeClock:
    """Seconds since the epoch that move only when the test says so."""

    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


ISSUED = 1_700_000_000.0
"""Long past: a verifier that looked at the real clock would refuse these tokens."""


async def test_a_remembered_token_is_accepted_until_expiry_and_leeway_then_refused(tokens):
    # Issued now by the real clock too: its cache entry is fresh by the real clock to the end.
    issued = time.time()
    clock = FakeClock(issued)
    verifier = tokens.verifier_with_clock(clock)
    token = issue_access_token(tokens.key, "user-2", Role.ANALYST, tokens.settings, now=issued)
    expires_at = int(issued) + tokens.settings.access_ttl_seconds
    assert (await verifier.verify(token)).expires_at == expires_at
    clock.now = expires_at + LEEWAY_SECONDS - 0.001  # its last moment of life (leeway included)
    assert (await verifier.verify(token)).subject == "user-2"
    clock.now = expires_at + LEEWAY_SECONDS
    with pytest.raises(InvalidToken, match="invalid token"):
        await verifier.verify(token)


@pytest.mark.parametrize(("offset", "accepted"), [(-0.001, True), (0.0, False)])
async def test_expiry_is_judged_by_the_verifiers_clock_on_first_sight(tokens, offset, accepted):
    token = issue_access_token(tokens.key, "user-3", Role.ANALYST, tokens.settings, now=ISSUED)
    expires_at = int(ISSUED) + tokens.settings.access_ttl_seconds
    verifier = tokens.verifier_with_clock(FakeClock(expires_at + LEEWAY_SECONDS + offset))
    if accepted:
        assert (await verifier.verify(token)).subject == "user-3"
    else:
        with pytest.raises(InvalidToken, match="invalid token"):
            await verifier.verify(token)


async def test_a_token_issued_after_the_verifiers_now_plus_leeway_is_refused(tokens):
    token = issue_access_token(tokens.key, "user-4", Role.ANALYST, tokens.settings, now=ISSUED)
    verifier = tokens.verifier_with_clock(FakeClock(ISSUED - LEEWAY_SECONDS - 1))
    with pytest.raises(InvalidToken, match="invalid token"):
        await verifier.verify(token)


def test_the_header_names_the_key_and_the_payload_holds_no_email(tokens):
    token = tokens.token(Role.CLINICIAN)
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": tokens.key.kid, "typ": "JWT"}
    payload = jwt.decode(token, options={"verify_signature": False})
    assert set(payload) == {"iss", "aud", "sub", "role", "iat", "exp", "jti"}


async def test_a_sessions_token_names_the_session_as_sid(tokens):
    token = issue_access_token(
        tokens.key, "user-5", Role.CLINICIAN, tokens.settings, session="family-1"
    )
    payload = jwt.decode(token, options={"verify_signature": False})
    assert set(payload) == {"iss", "aud", "sub", "role", "iat", "exp", "jti", "sid"}
    claims = await tokens.verifier.verify(token)
    assert (claims.session, claims.issued_at) == ("family-1", payload["iat"])


async def test_a_sid_that_is_not_a_string_is_refused(tokens):
    now = int(time.time())
    claims = {
        "iss": tokens.settings.issuer,
        "aud": tokens.settings.audience,
        "sub": "user-6",
        "role": Role.ANALYST.value,
        "iat": now,
        "exp": now + 60,
        "sid": 42,
    }
    token = jwt.encode(
        claims, tokens.key.private_key, algorithm="ES256", headers={"kid": tokens.key.kid}
    )
    with pytest.raises(InvalidToken, match="invalid token"):
        await tokens.verifier.verify(token)


def test_rotation_publishes_before_signing_and_prune_drops_only_retired_keys(tmp_path: Path):
    directory = tmp_path / "keys"
    ring = KeyRing(directory).ensure(development=True)
    first = ring.current_kid
    second = add_key(directory)
    ring.refresh()
    assert ring.current_kid == first, "a new key must not sign before it is published"
    assert set(keys_from_jwks(ring.jwks())) == {first, second}
    promote(directory, second)
    ring.refresh()
    assert ring.current_kid == second
    assert prune(directory, older_than_seconds=3600) == []
    assert prune(directory, older_than_seconds=0) == [first]
    ring.refresh()
    assert set(ring.keys) == {second}


def test_production_mode_never_invents_a_key(tmp_path: Path):
    settings = auth_settings(tmp_path / "keys", development=False)
    with pytest.raises(Exception, match="does not exist"):
        KeyRing(settings.keys_dir).ensure(development=False)
    settings.keys_dir.mkdir()
    with pytest.raises(Exception, match="no signing key"):
        KeyRing(settings.keys_dir).ensure(development=False)


def test_private_keys_are_readable_by_their_owner_only(tokens):
    for path in tokens.settings.keys_dir.glob("*.pem"):
        assert path.stat().st_mode & 0o077 == 0
