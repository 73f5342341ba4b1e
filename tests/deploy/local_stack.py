"""The local stack's service table (ops/local/stack.sh), which the deployments must match."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEV_ONLY = frozenset({"mail"})
"""Services of the local stack that only development runs (the mail capture)."""


def stack_services() -> dict[str, list[str]]:
    """Each app service of the local stack and its command, without `uv run`."""
    text = (ROOT / "ops/local/stack.sh").read_text()
    table = re.search(r"CARELOG_SERVICES_DEFAULT='\n(.*?)\n'", text, re.DOTALL)
    assert table, "ops/local/stack.sh has no CARELOG_SERVICES_DEFAULT table"
    services = {}
    for line in table.group(1).splitlines():
        name, command, _url = (part.strip() for part in line.split("|"))
        services[name] = command.removeprefix("uv run ").split()
    assert services, "the service table of ops/local/stack.sh is empty"
    return services
