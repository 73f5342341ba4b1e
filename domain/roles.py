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

PATIENT_ERASERS: frozenset[Role] = frozenset({Role.ADMIN})
"""Erase a patient for good (crypto-shredding: their data key is destroyed)."""

USER_ADMINS: frozenset[Role] = frozenset({Role.ADMIN})
"""Create, list, re-role and disable users (auth service)."""

CLINICIAN_ADMINS: frozenset[Role] = frozenset({Role.ADMIN})
"""Register clinicians, change their working hours and time off, link them to users."""

SCHEDULE_READERS: frozenset[Role] = ALL_ROLES
"""Read clinicians, their free slots and appointments (query API). Reasons: see REASON_READERS."""

APPOINTMENT_BOOKERS: frozenset[Role] = frozenset({Role.ADMIN, Role.RECEPTIONIST})
"""Book, reschedule and cancel appointments."""

APPOINTMENT_ATTENDERS: frozenset[Role] = frozenset({Role.ADMIN, Role.CLINICIAN})
"""Check in, complete and mark no-shows (a clinician: only their own appointments)."""

REASON_READERS: frozenset[Role] = frozenset({Role.ADMIN, Role.RECEPTIONIST, Role.CLINICIAN})
"""See an appointment's reason (a clinician: only on their own appointments)."""

ANALYTICS_READERS: frozenset[Role] = frozenset({Role.ADMIN, Role.ANALYST})
"""Read the analytics (counts and sums, never personal data)."""

NOTIFICATION_READERS: frozenset[Role] = frozenset({Role.ADMIN})
"""Read the notification ledger."""

HISTORY_READERS: frozenset[Role] = frozenset({Role.ADMIN, Role.CLINICIAN})
"""Read a patient's history: who changed which fields, when (query API)."""

HISTORY_VALUE_READERS: frozenset[Role] = frozenset({Role.ADMIN})
"""Also see each change's new values in a patient's history (never the old ones)."""

AUDIT_READERS: frozenset[Role] = frozenset({Role.ADMIN})
"""Read the disclosure audit (who was shown which patients' personal data)."""
