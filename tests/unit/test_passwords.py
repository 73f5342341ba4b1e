"""Password hashing and the weak-password policy."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from auth.errors import InvalidInput
from auth.passwords import (
    MIN_LENGTH,
    check_strength,
    hash_password,
    normalise_email,
    verify_password,
)


@settings(max_examples=5, deadline=None)
@given(st.text(min_size=1, max_size=64))
def test_a_hash_verifies_its_password_and_nothing_else(password):
    hashed = hash_password(password)
    assert hashed.startswith("$argon2id$")
    assert verify_password(hashed, password)
    assert not verify_password(hashed, password + "x")


@given(st.text(max_size=MIN_LENGTH - 1))
def test_every_short_password_is_refused(password):
    with pytest.raises(InvalidInput) as refused:
        check_strength(password, "someone@example.org")
    assert "password" in refused.value.errors


@pytest.mark.parametrize(
    "password", ["correct horse battery staple", "Tr0ub4dor&3-extra", "x7!Kq2#pLm9@zR"]
)
def test_strong_passwords_pass(password):
    check_strength(password, "someone@example.org")


def test_a_garbage_hash_never_verifies():
    assert not verify_password("not-a-hash", "anything")


@pytest.mark.parametrize("email", ["nope", "a@b", "two@@example.org", " ", "x" * 250 + "@e.org"])
def test_malformed_emails_are_refused(email):
    with pytest.raises(InvalidInput):
        normalise_email(email)


def test_emails_are_stored_trimmed_and_lower_case():
    assert normalise_email("  Ada@Example.ORG ") == "ada@example.org"
