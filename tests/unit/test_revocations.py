"""Revocations in memory: what a verifier refuses even when it has the token cached, and the
gateway's maps made from them. No services: the feed from PostgreSQL is tested in
tests/integration/test_revocation.py."""

from __future__ import annotations

import time
import uuid

import jwt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from auth.tokens import issue_access_token
from domain.roles import Role
from ops.gateway.generate import REVOKED_SESSIONS, REVOKED_SUBJECTS, revocation_maps
from runtime.security import Claims, InvalidToken, Revocation, Revocations

NOW = 1_800_000_000


def claims(subject: str = "u-1", issued_at: int = NOW, session: str | None = "s-1") -> Claims:
    return Claims(subject, Role.ANALYST, issued_at + 900, issued_at=issued_at, session=session)


def subject(key: str, cutoff: int, expires_at: int = NOW + 1000) -> Revocation:
    return Revocation(kind="subject", key=key, cutoff=cutoff, expires_at=expires_at)


def session(key: str, expires_at: int = NOW + 1000) -> Revocation:
    return Revocation(kind="session", key=key, cutoff=NOW, expires_at=expires_at)


@given(issued=st.integers(0, 2**40), cutoff=st.integers(0, 2**40))
def test_a_revoked_subject_refuses_exactly_the_tokens_issued_at_or_before_its_cutoff(
    issued, cutoff
):
    revocations = Revocations()
    revocations.apply(subject("u-1", cutoff))
    assert revocations.refuses(claims(issued_at=issued)) == (issued <= cutoff)
    assert not revocations.refuses(claims(subject="u-2", issued_at=issued))


def test_a_revoked_session_refuses_its_tokens_only():
    revocations = Revocations()
    revocations.apply(session("s-1"))
    assert revocations.refuses(claims(session="s-1", issued_at=NOW + 10**6))
    assert not revocations.refuses(claims(session="s-2"))
    assert not revocations.refuses(claims(session=None))


def test_the_later_cutoff_wins_whatever_the_order_of_arrival():
    revocations = Revocations()
    revocations.apply(subject("u-1", NOW + 5))
    revocations.apply(subject("u-1", NOW))  # an older announcement, late
    assert revocations.refuses(claims(issued_at=NOW + 5))


def test_a_reload_replaces_everything_and_prune_forgets_only_the_expired():
    revocations = Revocations()
    revocations.apply(session("gone"))
    revocations.replace([subject("u-1", NOW, expires_at=NOW + 1), session("s-1", NOW + 100)])
    assert not revocations.refuses(claims(subject="u-9", session="gone"))
    assert revocations.prune(NOW + 50)
    assert not revocations.refuses(claims(subject="u-1", session=None))
    assert revocations.refuses(claims(subject="u-9", session="s-1"))
    assert not revocations.prune(NOW + 50)


async def test_the_verifier_refuses_a_token_it_has_cached_once_it_is_revoked(tokens):
    revocations = Revocations()
    verifier = tokens.verifier_with_clock(time.time)
    verifier.revocations = revocations
    user, sid = str(uuid.uuid4()), str(uuid.uuid4())
    token = issue_access_token(tokens.key, user, Role.CLINICIAN, tokens.settings, session=sid)
    other = issue_access_token(tokens.key, user, Role.CLINICIAN, tokens.settings, session="s-9")
    first = await verifier.verify(token)
    assert (first.subject, first.session) == (user, sid)
    assert first.issued_at == jwt.decode(token, options={"verify_signature": False})["iat"]

    revocations.apply(session(sid))
    with pytest.raises(InvalidToken, match="revoked"):
        await verifier.verify(token)
    assert (await verifier.verify(other)).session == "s-9"

    revocations.apply(subject(user, int(time.time())))
    with pytest.raises(InvalidToken, match="revoked"):
        await verifier.verify(other)


def test_the_gateway_maps_hold_each_revocation_and_nothing_unsafe():
    user, sid = str(uuid.uuid4()), str(uuid.uuid4())
    maps = revocation_maps(
        [
            subject(user, NOW),
            session(sid),
            session("bad key\nshow map"),  # could not be a token's, and must not reach HAProxy
        ]
    )
    assert maps == {REVOKED_SUBJECTS: [f"{user} {NOW}"], REVOKED_SESSIONS: [f"{sid} 1"]}
