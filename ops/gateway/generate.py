"""Renders the HAProxy gateway's files from the template and the current public keys.

`carelog gateway-config` writes, under CARELOG_GATEWAY_DIR:

    haproxy.cfg          ops/gateway/haproxy.cfg with one JWT rule per key id
    keys/<kid>.pem       the public key of each published signing key
    docs/<service>.json  each service's OpenAPI, with gateway paths and the roles per operation
    docs/index.html      a page that browses them

then checks the result with `haproxy -c` before it replaces the live file, and
(`--reload`) asks the running HAProxy master to reload it gracefully (SIGUSR2):
connections in flight finish on the old workers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

from litestar import Litestar

from runtime.security import KID, role_matrix
from runtime.settings import Settings

TEMPLATES = Path(__file__).resolve().parent

SUBJECT_RATE_PER_SECOND = 200
"""Requests per second one token subject may send (429 with Retry-After: 1 beyond)."""
ADDRESS_RATE_PER_10S = 300
"""Requests per 10 s from one address without a valid token."""
LOGIN_ACCOUNT_PER_MINUTE = 10
"""Login attempts per minute for one (address, email)."""
LOGIN_ADDRESS_PER_MINUTE = 100
"""Login attempts per minute from one address, whatever the email."""
MAX_BODY_BYTES = 64 * 1024


class GatewayConfigError(Exception):
    """The rendered configuration does not pass `haproxy -c`, or no key is known."""


def annotated(app: Litestar, prefix: str = "") -> dict[str, Any]:
    """The app's OpenAPI, with paths as the gateway serves them and each operation's roles."""
    schema = app.openapi_schema.to_schema()
    # Routes are keyed like /patients/{patient_id:str}; OpenAPI writes /patients/{patient_id}.
    matrix = {
        (method, re.sub(r":[^}]*}", "}", path)): roles
        for (method, path), roles in role_matrix(app).items()
    }
    paths = {}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            roles = matrix.get((method.upper(), path))
            if isinstance(operation, dict) and roles is not None:
                operation["security"] = [{"bearer": []}]
                operation["x-roles"] = sorted(r.value for r in roles)
                operation.setdefault("responses", {}).update(
                    {
                        "401": {"description": "No valid bearer token"},
                        "403": {"description": "The token's role may not do this"},
                    }
                )
        paths[prefix + path] = operations
    schema["paths"] = paths
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http",
        "scheme": "bearer",
        "bearerFormat": "JWT (ES256)",
    }
    schema["servers"] = [{"url": "/"}]
    return schema


def _cors_acl(origins: tuple[str, ...]) -> str:
    if "*" in origins:
        return "    acl cors_origin req.hdr(origin) -m found"
    if not origins:
        return "    acl cors_origin always_false"
    return "    acl cors_origin req.hdr(origin) -m str " + " ".join(origins)


def render(settings: Settings, keys: dict[str, bytes], documents: dict[str, Any]) -> str:
    """haproxy.cfg for these settings, public keys (PEM by kid) and OpenAPI documents."""
    out = Path(settings.gateway_dir)
    jwt_rules = "\n".join(
        f"    http-request set-var(txn.jwt_sig) var(txn.bearer),"
        f'jwt_verify(txn.jwt_alg,"{out / "keys" / kid}.pem") if needs_token'
        f" {{ var(txn.jwt_alg) -m str ES256 }} {{ var(txn.jwt_kid) -m str {kid} }}"
        for kid in keys
    )
    docs_rules = [
        f"    http-request return status 200 content-type text/html file {out}/docs/index.html"
        " if METH_GET { path /api-docs /api-docs/ }"
    ] + [
        f"    http-request return status 200 content-type application/json"
        f" file {out}/docs/{name}.json if METH_GET {{ path /api-docs/{name} }}"
        for name in documents
    ]
    largest = max(len(json.dumps(d, separators=(",", ":"))) for d in documents.values())
    bufsize = 16384
    while bufsize < largest + 2048:  # HAProxy keeps `maxrewrite` (1 KiB) of it free
        bufsize *= 2
    values = {
        "BUFSIZE": str(bufsize),
        "DIR": str(out),
        "HOST": settings.http_host,
        "UPSTREAM": settings.http_host,
        "PORT": str(settings.gateway_port),
        "METRICS_PORT": str(settings.gateway_port + 20),
        "COMMANDS_PORT": str(settings.ports["commands"]),
        "QUERIES_PORT": str(settings.ports["read-api"]),
        "AUTH_PORT": str(settings.ports["auth"]),
        "ISSUER": settings.jwt_issuer,
        "AUDIENCE": settings.jwt_audience,
        "MAX_BODY": str(MAX_BODY_BYTES),
        "SUBJECT_RATE": str(SUBJECT_RATE_PER_SECOND),
        "ADDRESS_RATE": str(ADDRESS_RATE_PER_10S),
        "LOGIN_ACCOUNT_RATE": str(LOGIN_ACCOUNT_PER_MINUTE),
        "LOGIN_ADDRESS_RATE": str(LOGIN_ADDRESS_PER_MINUTE),
        "CORS_ACL": _cors_acl(settings.cors_origins),
        "JWT_RULES": jwt_rules,
        "DOCS_RULES": "\n".join(docs_rules),
    }
    text = (TEMPLATES / "haproxy.cfg").read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def write_config(settings: Settings, keys: dict[str, bytes], documents: dict[str, Any]) -> Path:
    """Writes the gateway's files (keys: PEM by kid); returns the path of haproxy.cfg."""
    if not keys:
        raise GatewayConfigError("no public keys to trust")
    for kid in keys:
        if not KID.match(kid):
            raise GatewayConfigError(f"unusable key id {kid!r}")
    out = Path(settings.gateway_dir)
    (out / "keys").mkdir(parents=True, exist_ok=True)
    (out / "docs").mkdir(parents=True, exist_ok=True)
    for kid, pem in keys.items():
        _write(out / "keys" / f"{kid}.pem", pem)
    for name, document in documents.items():
        _write(out / "docs" / f"{name}.json", json.dumps(document, separators=(",", ":")).encode())
    page = (TEMPLATES / "docs.html").read_text().replace("@SERVICES@", json.dumps(list(documents)))
    _write(out / "docs" / "index.html", page.encode())
    candidate = out / "haproxy.cfg.new"
    candidate.write_text(render(settings, keys, documents))
    check = subprocess.run(  # noqa: S603 (fixed program, our own file)
        [haproxy_binary(), "-c", "-q", "-f", str(candidate)],
        capture_output=True,
        text=True,
        check=False,
    )
    if check.returncode != 0:
        raise GatewayConfigError(f"haproxy -c refused {candidate}:\n{check.stdout}{check.stderr}")
    os.replace(candidate, out / "haproxy.cfg")
    live = {f"{kid}.pem" for kid in keys}
    for stale in (out / "keys").glob("*.pem"):
        if stale.name not in live:
            stale.unlink()
    return out / "haproxy.cfg"


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )
    if found is None:
        raise GatewayConfigError("haproxy is not installed (run ops/local/install.sh)")
    return found


def reload(settings: Settings) -> bool:
    """Asks the running HAProxy master to reload its configuration; False if none runs."""
    pidfile = Path(settings.gateway_dir) / "haproxy.pid"
    try:
        pid = int(pidfile.read_text().split()[0])
        os.kill(pid, signal.SIGUSR2)
    except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
        return False
    return True
