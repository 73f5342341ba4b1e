"""Password hashing (argon2id) and the policy that refuses weak passwords."""

from __future__ import annotations

import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from auth.errors import InvalidInput

# OWASP's argon2id profile (46 MiB, 1 pass, 1 lane): ~55 ms on one core, and one
# core per hash, so the service can bound how much CPU logins take (hash_workers).
HASHER = PasswordHasher(time_cost=1, memory_cost=47104, parallelism=1)

MIN_LENGTH = 12
MAX_LENGTH = 128
EMAIL_MAX = 254
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_COMMON = frozenset(
    {
        "password1234",
        "password12345",
        "passwordpassword",
        "123456789012",
        "qwertyuiopas",
        "iloveyou1234",
        "letmein12345",
        "welcome12345",
        "administrator",
        "changeme1234",
    }
)


def hash_password(password: str) -> str:
    return HASHER.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return HASHER.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    return HASHER.check_needs_rehash(password_hash)


def normalise_email(email: str) -> str:
    """The email as stored and compared: trimmed, lower case; InvalidInput if malformed."""
    value = email.strip().lower()
    if len(value) > EMAIL_MAX or not _EMAIL.match(value):
        raise InvalidInput({"email": "is not an email address"})
    return value


def check_strength(password: str, email: str) -> None:
    """Raises InvalidInput naming what makes the password weak."""
    problem = None
    if len(password) < MIN_LENGTH:
        problem = f"must be at least {MIN_LENGTH} characters"
    elif len(password) > MAX_LENGTH:
        problem = f"must be at most {MAX_LENGTH} characters"
    elif len(set(password)) < 6:
        problem = "must use at least 6 different characters"
    elif password.lower() in _COMMON:
        problem = "is too common"
    else:
        local = email.split("@", 1)[0].lower()
        if len(local) >= 3 and local in password.lower():
            problem = "must not contain the email address"
    if problem:
        raise InvalidInput({"password": problem})
