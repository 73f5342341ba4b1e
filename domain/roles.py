"""Roles, and which roles each group of endpoints admits: the authorization matrix.

docs/auth.md shows the same matrix; tests/unit/test_role_matrix_docs.py keeps the two equal.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    ADMIN = "admin"
    CLINICIAN = "clinician"
    RECEPTIONIST = "receptionist"
    BILLING = "billing"
    ANALYST = "analyst"


ALL_ROLES: frozenset[Role] = frozenset(Role)

PATIENT_READERS: frozenset[Role] = ALL_ROLES
"""Read patients (query API)."""

PATIENT_WRITERS: frozenset[Role] = frozenset({Role.ADMIN, Role.CLINICIAN, Role.RECEPTIONIST})
"""Register, change and remove patients (command API)."""

USER_ADMINS: frozenset[Role] = frozenset({Role.ADMIN})
"""Create, list, re-role and disable users (auth service)."""
