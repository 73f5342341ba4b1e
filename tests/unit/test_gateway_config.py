"""The rendered HAProxy config: one JWT rule per key, HAProxy accepts it, docs use gateway paths."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from auth.keys import KeyRing, add_key
from bootstrap import gateway
from bootstrap.asyncapi import document
from ops.gateway import generate as gateway_config
from runtime.apidocs import ASSETS_PATH
from runtime.settings import Settings, SettingsError
from tests.support.apps import OFFLINE
from tests.support.tokens import auth_settings

SETTINGS = OFFLINE


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
@pytest.mark.parametrize("origins", [("http://a.example",), ("http://a.example", "*")])
def test_the_config_has_a_rule_per_key_and_haproxy_accepts_it(auth, settings, origins):
    path = gateway.write_config(settings.with_(cors_origins=origins), auth)
    out = Path(settings.gateway_dir)
    text = path.read_text()
    kids = sorted(p.stem for p in auth.keys_dir.glob("*.pem"))
    assert len(kids) == 2
    for kid in kids:
        assert f'/keys/{kid}.pem") if needs_token' in text
        assert (out / "keys" / f"{kid}.pem").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert "PRIVATE" not in "".join(p.read_text() for p in (out / "keys").glob("*.pem"))
    assert "-m str -i http://a.example" in text or "-m reg -i ^https?://" in text
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
    assert set(documents) == {"patients", "auth", "events"}
    patients = documents["patients"]["paths"]
    assert {"/api/patients", "/api/patients/{patient_id}"} <= set(patients)
    assert {"/api/appointments", "/api/clinicians/{clinician_id}/slots"} <= set(patients)
    assert all(path.startswith("/api/") for path in patients)
    assert patients["/api/patients"]["post"]["x-required-roles"] == [
        "admin",
        "clinician",
        "receptionist",
    ]
    one = patients["/api/patients/{patient_id}"]
    assert one["put"]["x-required-roles"] == ["admin", "clinician", "receptionist"]
    assert one["get"]["security"] == [{"bearer": []}]
    booking = patients["/api/appointments"]["post"]["x-required-roles"]
    assert booking == ["admin", "receptionist"]
    assert len(patients["/api/patients"]["get"]["x-required-roles"]) == 5
    assert patients["/api/audit"]["get"]["x-required-roles"] == ["admin"]
    login = documents["auth"]["paths"]["/auth/login"]["post"]
    assert "x-required-roles" not in login
    assert "security" not in login


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is installed by make install")
def test_the_events_asyncapi_document_is_served_and_listed(auth, settings):
    path = gateway.write_config(settings, auth)
    out = Path(settings.gateway_dir)
    rule = (
        f"http-request return status 200 content-type application/json"
        f" file {out}/docs/events.json if METH_GET {{ path /api-docs/events }}"
    )
    assert rule in path.read_text()
    assert json.loads((out / "docs" / "events.json").read_text()) == document()
    page = (out / "docs" / "index.html").read_text()
    assert '"events"' in page and "events (AsyncAPI)" in page


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is installed by make install")
def test_the_docs_page_is_swagger_ui_from_the_gateway_itself(auth, settings):
    config = gateway.write_config(settings, auth).read_text()
    page = (Path(settings.gateway_dir) / "docs" / "index.html").read_text()
    assert "@" not in page  # no placeholder left behind
    assert '"patients", "auth"' in page and "SwaggerUIBundle(" in page
    for asset in ("swagger-ui-bundle.js", "swagger-ui-standalone-preset.js", "swagger-ui.css"):
        assert f'"{gateway_config.DOCS_ASSETS}/{asset}"' in page
    assert re.findall(r"(?:src|href)=\"([^\"]*)\"", page) == [
        f"{gateway_config.DOCS_ASSETS}/favicon-32x32.png",
        f"{gateway_config.DOCS_ASSETS}/swagger-ui.css",
        f"{gateway_config.DOCS_ASSETS}/swagger-ui-bundle.js",
        f"{gateway_config.DOCS_ASSETS}/swagger-ui-standalone-preset.js",
    ]
    assert "use_backend docs_assets if is_docs_asset" in config
    assert "replace-path ^/api-docs/assets/(.*)$ /schema/assets/\\1" in config
    assert gateway_config.DOCS_ASSETS.removeprefix("/api-docs/assets") == (
        ASSETS_PATH.removeprefix("/schema/assets")
    )


@pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is installed by make install")
def test_haproxys_own_answers_are_problem_json(auth, settings):
    config = gateway.write_config(settings, auth).read_text()
    for status in gateway_config.ERRORS:
        page = Path(settings.gateway_dir) / "errors" / f"{status}.http"
        assert f"errorfile {status} {page}" in config
        head, body = page.read_bytes().split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        assert lines[0].startswith(f"HTTP/1.1 {status} ")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        assert headers["content-type"] == "application/problem+json"
        assert int(headers["content-length"]) == len(body)
        assert json.loads(body)["status"] == status


def test_the_rate_limits_count_only_the_requests_they_let_through():
    template = (gateway_config.TEMPLATES / "haproxy.cfg").read_text()
    rules = template.splitlines()
    (throttled,) = [i for i, line in enumerate(rules) if "sc-inc-gpc(0,0)" in line]
    refusals = [i for i, line in enumerate(rules) if "sc_gpc_rate(0,0) ge" in line]
    assert len(refusals) == 2
    assert all(i < throttled for i in refusals), "checked before the passing request is counted"
    assert "sc_http_req_rate(0)" not in template
    assert "http_req_rate(1s)" not in template


def test_the_cors_acl_lists_the_origins_and_never_null(auth, settings):
    listed = settings.with_(cors_origins=("http://localhost:3000", "https://app.example.org"))
    text = gateway_config.render(listed, {"k1": b""}, {"auth": {}})
    assert (
        "acl cors_origin req.fhdr(origin) -m str -i http://localhost:3000 https://app.example.org"
        in text
    )
    anyone = gateway_config.render(settings.with_(cors_origins=("*",)), {"k1": b""}, {"auth": {}})
    (acl,) = [line for line in anyone.splitlines() if "acl cors_origin" in line]
    assert "-m found" not in acl  # `null` is an Origin too; it must not match
    assert "^https?://" in acl


def test_the_development_default_is_localhost_origins():
    settings = Settings.from_env({"CARELOG_ENV": "development"})
    assert "http://localhost:4004" in settings.cors_origins
    assert "http://127.0.0.1:4004" in settings.cors_origins
    assert all(
        o.startswith(("http://localhost:", "http://127.0.0.1:")) for o in settings.cors_origins
    )


PRODUCTION = {
    "CARELOG_ENV": "production",
    "CARELOG_DATABASE_URL": "postgresql://unused@127.0.0.1:1/none",
    "CARELOG_REDIS_URL": "redis://127.0.0.1:1/0",
    "CARELOG_KAFKA_BOOTSTRAP": "127.0.0.1:1",
    "CARELOG_JWKS_URL": "http://127.0.0.1:1/unused",
    # Brokers that take no credentials: production accepts them only on a trusted network.
    "CARELOG_TRUSTED_NETWORK": "true",
}


@pytest.mark.parametrize(
    ("origins", "message"),
    [
        ("*", "CARELOG_GATEWAY_CORS_ORIGINS='*' is not allowed in production"),
        ("https://app.example.org *", "not allowed in production"),
        ("null", "may not list 'null'"),
        ("https://app.example.org/", "expected origins like https://app.example.org"),
        ("app.example.org", "expected origins like https://app.example.org"),
        ("https://a.example{acl}", "expected origins like"),
    ],
)
def test_production_settings_refuse_a_wildcard_null_and_malformed_origins(origins, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.from_env({**PRODUCTION, "CARELOG_GATEWAY_CORS_ORIGINS": origins})


def test_production_settings_take_an_explicit_list():
    origins = "https://app.example.org https://admin.example.org:8443"
    settings = Settings.from_env({**PRODUCTION, "CARELOG_GATEWAY_CORS_ORIGINS": origins})
    assert settings.cors_origins == ("https://app.example.org", "https://admin.example.org:8443")


def test_null_is_refused_in_development_too():
    with pytest.raises(SettingsError, match="may not list 'null'"):
        Settings.from_env({"CARELOG_ENV": "development", "CARELOG_GATEWAY_CORS_ORIGINS": "null"})


def test_the_production_gateway_needs_an_origin_list(settings):
    production = Settings.from_env(PRODUCTION).with_(gateway_dir=settings.gateway_dir)
    with pytest.raises(gateway_config.GatewayConfigError, match="CARELOG_GATEWAY_CORS_ORIGINS"):
        gateway_config.render(production, {"k1": b""}, {"auth": {}})
