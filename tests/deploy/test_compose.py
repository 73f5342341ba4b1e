"""compose.yaml: valid by the Compose specification's JSON schema (the copy check-jsonschema
ships), and the same processes as the local stack, the HAProxy gateway in front."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ops.gateway.generate import render
from runtime.settings import Settings, SettingsError
from tests.deploy.local_stack import ROOT, stack_services

COMPOSE = ROOT / "compose.yaml"
UPSTREAMS = {"commands": 4000, "read-api": 4003, "auth": 4005}


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent))
    assert tool, "check-jsonschema is not installed (uv sync)"
    return subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())  # resolves `<<: *app`
    return loaded


def interpolated(value: str) -> str:
    """Compose's `${NAME:-default}` with nothing set: the default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def test_compose_follows_the_compose_specification() -> None:
    checked = check_compose_schema(COMPOSE)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_schema_check_refuses_a_malformed_file(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:", "    health_check:", 1))
    assert check_compose_schema(broken).returncode != 0


def test_every_process_of_the_local_stack_is_a_compose_service(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, command in stack_services().items():
        assert name in services, f"{name} runs in the local stack but not in compose.yaml"
        assert services[name]["command"][: len(command)] == command, name


def test_the_gateway_fronts_commands_read_api_and_auth(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    script = " ".join(gateway["command"])
    assert "carelog gateway-config" in script and "exec haproxy" in script
    assert "127.0.0.1:4004:4004" in gateway["ports"]
    assert {name: dep["condition"] for name, dep in gateway["depends_on"].items()} == dict.fromkeys(
        UPSTREAMS, "service_healthy"
    )
    assert "/health/ready" in " ".join(gateway["healthcheck"]["test"])


def test_the_gateway_configuration_names_the_compose_services(compose: dict[str, Any]) -> None:
    environ = {
        k: interpolated(str(v)) for k, v in compose["services"]["gateway"]["environment"].items()
    }
    settings = Settings.from_env(environ, stack_secrets=None).with_(gateway_dir="/gateway")
    config = render(settings, {"k1": b"key"}, {"patients": {"openapi": "3.1.0"}})
    servers = dict(re.findall(r"^\s+server \S+ (\S+):(\d+) check", config, re.MULTILINE))
    assert servers == {name: str(port) for name, port in UPSTREAMS.items()}
    for name in servers:
        assert name in compose["services"], name
    assert re.search(r"^\s+bind 0\.0\.0\.0:4004$", config, re.MULTILINE)


@pytest.mark.parametrize("pairs", ["billing=billing", "commands", "commands=bad/host"])
def test_a_gateway_upstream_must_be_a_service_behind_it_and_a_host(pairs: str) -> None:
    environ = {"CARELOG_ENV": "development", "CARELOG_GATEWAY_UPSTREAMS": pairs}
    with pytest.raises(SettingsError, match="CARELOG_GATEWAY_UPSTREAMS"):
        Settings.from_env(environ, stack_secrets=None)
