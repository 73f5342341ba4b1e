"""The attack suite's own edge: auth, command and query APIs and a gateway in front of them,
real processes on an isolated database and topic prefix (never the shared stack's), with
access tokens of the suite's own."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from domain.roles import Role
from ops.gateway.generate import Limits
from tests.support.revocation import Stack, revocation_stack
from tests.support.tokens import TestTokens

UNTHROTTLED = Limits(
    subject_per_second=100_000,
    address_per_10s=100_000,
    login_account_per_minute=100_000,
    login_address_per_minute=100_000,
)
"""The edge gateway's rates: high, so hostile requests reach the services, not a 429."""
SHORT_WAIT = {"CARELOG_READ_WAIT_SECONDS": "0.2"}
"""Nothing projects here, so a `minPosition` always waits its whole bound: keep it short."""


@pytest.fixture(scope="package")
def edge_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("edge")


@pytest.fixture(scope="package")
def edge(edge_home: Path) -> Iterator[Stack]:
    with revocation_stack(edge_home, gateway=True, limits=UNTHROTTLED, extra_env=SHORT_WAIT) as up:
        yield up


@pytest.fixture(scope="package")
def edge_tokens(edge: Stack, edge_home: Path) -> TestTokens:
    """Signs with the key the edge's auth service made (revocation_stack keeps it under
    `edge_home / "keys"`), so the edge's services and gateway trust these tokens."""
    return TestTokens(edge_home / "keys")


@pytest.fixture(scope="package")
def edge_admin(edge_tokens: TestTokens) -> dict[str, str]:
    """Headers with an admin access token of the suite's own."""
    return edge_tokens.headers(Role.ADMIN)
