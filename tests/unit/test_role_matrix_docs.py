"""docs/auth.md's role matrix says exactly what the services' guards enforce."""

from __future__ import annotations

import re
from pathlib import Path

from auth.app import create_app as auth_app
from commands.api import create_app as commands_app
from domain.roles import Role
from read_api.app import create_app as read_app
from runtime.security import role_matrix
from runtime.settings import Settings
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
    settings = Settings(
        env="development",
        database_url="postgresql://unused@127.0.0.1:1/none",
        redis_url="redis://127.0.0.1:1/0",
        kafka_bootstrap="127.0.0.1:1",
        jwks_url="http://127.0.0.1:1/unused",
    )
    apps = [
        (commands_app(settings, verifier=tokens.verifier), "/api"),
        (read_app(settings, verifier=tokens.verifier), "/api"),
        (auth_app(settings, tokens.settings), ""),
    ]
    matrix = {}
    for app, prefix in apps:
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
