"""The rendered HAProxy config: one JWT rule per key, HAProxy accepts it, docs use gateway paths."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from auth.keys import KeyRing, add_key
from bootstrap import gateway
from ops.gateway import generate as gateway_config
from runtime.settings import Settings
from tests.support.tokens import auth_settings

SETTINGS = Settings(
    env="development",
    database_url="postgresql://unused@127.0.0.1:1/none",
    redis_url="redis://127.0.0.1:1/0",
    kafka_bootstrap="127.0.0.1:1",
    jwks_url="http://127.0.0.1:1/unused",
)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return SETTINGS.with_(gateway_dir=str(tmp_path / "gateway"), cors_origins=("http://a.example",))


@pytest.fixture
def auth(tmp_path: Path):
    settings = auth_settings(tmp_path / "keys")
    KeyRing(settings.keys_dir).ensure(development=True)
    add_key(settings.keys_dir)
    return settings


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is installed by make install")
def test_the_config_has_a_rule_per_key_and_haproxy_accepts_it(auth, settings):
    path = gateway.write_config(settings, auth)
    out = Path(settings.gateway_dir)
    text = path.read_text()
    kids = sorted(p.stem for p in auth.keys_dir.glob("*.pem"))
    assert len(kids) == 2
    for kid in kids:
        assert f'/keys/{kid}.pem") if needs_token' in text
        assert (out / "keys" / f"{kid}.pem").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert "PRIVATE" not in "".join(p.read_text() for p in (out / "keys").glob("*.pem"))
    assert "-m str http://a.example" in text
    assert "@" not in text.replace("@bench", "")  # no placeholder left behind
    check = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    assert "WARNING" not in check.stderr


def test_the_logs_never_carry_query_strings_or_headers():
    template = (gateway_config.TEMPLATES / "haproxy.cfg").read_text()
    (log_format,) = [line for line in template.splitlines() if "log-format" in line]
    for leaky in ("%r", "%HU", "%HQ", "%hr", "%hrl", "%CC"):
        assert leaky not in log_format.split()
    assert "%HPO" in log_format


def test_the_docs_use_gateway_paths_and_name_roles(auth):
    documents = gateway.api_documents(SETTINGS, auth)
    assert set(documents) == {"patients", "auth"}
    patients = documents["patients"]["paths"]
    assert {"/api/patients", "/api/patients/{patient_id}"} <= set(patients)
    assert {"/api/appointments", "/api/clinicians/{clinician_id}/slots"} <= set(patients)
    assert all(path.startswith("/api/") for path in patients)
    assert patients["/api/patients"]["post"]["x-roles"] == ["admin", "clinician", "receptionist"]
    one = patients["/api/patients/{patient_id}"]
    assert one["put"]["x-roles"] == ["admin", "clinician", "receptionist"]
    assert one["get"]["security"] == [{"bearer": []}]
    booking = patients["/api/appointments"]["post"]["x-roles"]
    assert booking == ["admin", "receptionist"]
    assert len(patients["/api/patients"]["get"]["x-roles"]) == 5
    login = documents["auth"]["paths"]["/auth/login"]["post"]
    assert "x-roles" not in login
    assert "security" not in login
