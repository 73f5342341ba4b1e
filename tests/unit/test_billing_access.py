"""Billing's role table covers every BillingService method, and docs/auth.md shows it."""

from __future__ import annotations

import re
from pathlib import Path

from billing_grpc.access import METHOD_ROLES
from billing_grpc.api import SERVICE_NAME
from billing_grpc.generated.carelog.billing import v1 as pb
from domain.roles import Role

DOC = Path(__file__).resolve().parents[2] / "docs" / "auth.md"


def documented() -> dict[str, frozenset[Role]]:
    text = DOC.read_text().split("## Billing over gRPC", 1)[1].split("\n## ", 1)[0]
    header = re.search(r"^\| method \|(.*)\|$", text, re.M)
    assert header is not None
    roles = [Role(name.strip()) for name in header.group(1).split("|")]
    matrix: dict[str, frozenset[Role]] = {}
    for line in text.splitlines():
        row = re.match(r"^\| `(\w+)` \|(.*)\|$", line)
        if row is None:
            continue
        cells = [c.strip() for c in row.group(2).split("|")]
        assert len(cells) == len(roles), line
        assert set(cells) <= {"yes", "no"}, line
        matrix[row.group(1)] = frozenset(r for r, c in zip(roles, cells, strict=True) if c == "yes")
    return matrix


def test_every_method_of_the_service_has_its_roles():
    paths = pb.BillingServiceBase().__mapping__()
    methods = {path.rsplit("/", 1)[1] for path in paths if path.startswith(f"/{SERVICE_NAME}/")}
    assert methods == set(METHOD_ROLES)


def test_the_documented_billing_roles_are_the_enforced_ones():
    assert documented() == dict(METHOD_ROLES)


def test_only_admins_and_billing_charge_and_analysts_call_nothing():
    assert (
        METHOD_ROLES["CreateInvoice"]
        == METHOD_ROLES["RecordPayment"]
        == {
            Role.ADMIN,
            Role.BILLING,
        }
    )
    assert all(Role.ANALYST not in roles for roles in METHOD_ROLES.values())
