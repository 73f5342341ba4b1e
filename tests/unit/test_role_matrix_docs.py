"""docs/auth.md's role matrix says exactly what the services' guards enforce."""

from __future__ import annotations

import re
from pathlib import Path

from domain.roles import Role
from runtime.security import role_matrix
from tests.support.apps import offline_apps
from tests.support.tokens import TestTokens

DOC = Path(__file__).resolve().parents[2] / "docs" / "auth.md"
OPEN = {"/health/live", "/health/ready", "/metrics"}


def documented() -> dict[tuple[str, str], frozenset[Role] | None]:
    text = DOC.read_text().split("## Roles and what each may do", 1)[1]
    header = re.search(r"^\| endpoint \|(.*)\|$", text, re.M)
    assert header is not None
    roles = [Role(name.strip()) for name in header.group(1).split("|")]
    matrix: dict[tuple[str, str], frozenset[Role] | None] = {}
    for line in text.splitlines():
        row = re.match(r"^\| `(GET|POST|PUT|DELETE) (\S+)` \|(.*)\|$", line)
        if row is None:
            continue
        cells = [c.strip() for c in row.group(3).split("|")]
        assert len(cells) == len(roles), line
        key = (row.group(1), row.group(2))
        if set(cells) == {"public"}:
            matrix[key] = None
        else:
            assert set(cells) <= {"yes", "no"}, line
            matrix[key] = frozenset(r for r, c in zip(roles, cells, strict=True) if c == "yes")
    return matrix


def enforced(tokens: TestTokens) -> dict[tuple[str, str], frozenset[Role] | None]:
    matrix = {}
    for app, prefix in offline_apps(tokens):
        for (method, path), roles in role_matrix(app).items():
            if path in OPEN or path.startswith("/schema"):
                continue
            public_path = prefix + re.sub(r"\{[^}]*\}", "{id}", path)
            matrix[(method, public_path)] = roles
    return matrix


def test_the_documented_matrix_is_the_enforced_one(tokens):
    assert documented() == enforced(tokens)


def test_analysts_read_but_do_not_write_and_only_admins_manage_users(tokens):
    matrix = enforced(tokens)
    assert Role.ANALYST in matrix[("GET", "/api/patients")]
    assert Role.ANALYST not in matrix[("POST", "/api/patients")]
    assert matrix[("POST", "/auth/users")] == {Role.ADMIN}
