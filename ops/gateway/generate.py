"""Renders the HAProxy gateway's files from the template and the current public keys.

`carelog gateway-config` writes, under CARELOG_GATEWAY_DIR:

    haproxy.cfg          ops/gateway/haproxy.cfg with one JWT rule per key id
    keys/<kid>.pem       the public key of each published signing key
    docs/<service>.json  each service's OpenAPI, with gateway paths and the roles per operation
    docs/events.json     the Kafka topics' AsyncAPI document (schemas/asyncapi.json)
    docs/index.html      the /api-docs page: Swagger UI over them, its files from the services
    revoked-*.map        revoked sessions and subjects (created empty; the watcher fills them)

then checks the result with `haproxy -c` before it replaces the live file, and
(`--reload`) asks the running HAProxy master to reload it gracefully (SIGUSR2):
connections in flight finish on the old workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litestar import Litestar

from runtime.apidocs import ASSETS_PATH
from runtime.http import PROBLEM, PROBLEM_MEDIA, openapi_document
from runtime.security import KID, Revocation
from runtime.settings import Settings

TEMPLATES = Path(__file__).resolve().parent

SUBJECT_RATE_PER_SECOND = 200
"""Requests per second answered for one token subject (429 with Retry-After: 1 beyond)."""
ADDRESS_RATE_PER_10S = 300
"""Requests per 10 s answered for one address without a valid token."""
LOGIN_ACCOUNT_PER_MINUTE = 10
"""Login attempts per minute for one (address, email)."""
LOGIN_ADDRESS_PER_MINUTE = 100
"""Login attempts per minute from one address, whatever the email."""
MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class Limits:
    """The gateway's rates. The subject and address limits count only the requests they let
    through (a client above them is throttled to them); the login limits count every attempt."""

    subject_per_second: int = SUBJECT_RATE_PER_SECOND
    address_per_10s: int = ADDRESS_RATE_PER_10S
    login_account_per_minute: int = LOGIN_ACCOUNT_PER_MINUTE
    login_address_per_minute: int = LOGIN_ADDRESS_PER_MINUTE


DEFAULT_LIMITS = Limits()


class GatewayConfigError(Exception):
    """The rendered configuration does not pass `haproxy -c`, or no key is known."""


def annotated(app: Litestar, prefix: str = "") -> dict[str, Any]:
    """The app's OpenAPI as the gateway serves it: its paths under `prefix`, and the 429
    the gateway's rate limits add to every operation. Security and roles
    (`x-required-roles`) are the service's own document's, from its guards."""
    schema = openapi_document(app)
    throttled = {
        "description": "Too many requests from this token or address; retry after Retry-After",
        "headers": {
            "Retry-After": {
                "description": "Seconds to wait",
                "schema": {"type": "string"},
                "required": True,
            }
        },
        "content": {PROBLEM_MEDIA: {"schema": {"$ref": f"#/components/schemas/{PROBLEM}"}}},
    }
    paths = {}
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            if isinstance(operation, dict) and "responses" in operation:
                operation["responses"]["429"] = throttled
        paths[prefix + path] = operations
    schema["paths"] = paths
    schema["servers"] = [{"url": "/"}]
    return schema


def _cors_acl(settings: Settings) -> str:
    """The `cors_origin` ACL: the listed origins (settings checked their form), never `null`."""
    origins = settings.cors_origins
    if not origins and not settings.development:
        raise GatewayConfigError(
            "CARELOG_GATEWAY_CORS_ORIGINS is required in production: list each origin whose"
            " pages may call the API, like https://app.example.org"
        )
    if "*" in origins:  # development only: any http(s) origin, which `null` is not
        return "    acl cors_origin req.fhdr(origin) -m reg -i ^https?://[^/]+$"
    if not origins:
        return "    acl cors_origin always_false"
    return "    acl cors_origin req.fhdr(origin) -m str -i " + " ".join(origins)


def render(
    settings: Settings,
    keys: dict[str, bytes],
    documents: dict[str, Any],
    limits: Limits = DEFAULT_LIMITS,
) -> str:
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
        "COMMANDS_HOST": settings.upstream("commands"),
        "QUERIES_HOST": settings.upstream("read-api"),
        "AUTH_HOST": settings.upstream("auth"),
        "PORT": str(settings.gateway_port),
        "METRICS_PORT": str(settings.gateway_port + 20),
        "COMMANDS_PORT": str(settings.ports["commands"]),
        "QUERIES_PORT": str(settings.ports["read-api"]),
        "AUTH_PORT": str(settings.ports["auth"]),
        "ISSUER": settings.jwt_issuer,
        "AUDIENCE": settings.jwt_audience,
        "MAX_BODY": str(MAX_BODY_BYTES),
        "SUBJECT_RATE": str(limits.subject_per_second),
        "ADDRESS_RATE": str(limits.address_per_10s),
        "LOGIN_ACCOUNT_RATE": str(limits.login_account_per_minute),
        "LOGIN_ADDRESS_RATE": str(limits.login_address_per_minute),
        "CORS_ACL": _cors_acl(settings),
        "JWT_RULES": jwt_rules,
        "DOCS_RULES": "\n".join(docs_rules),
        "ERROR_FILES": "\n".join(
            f"    errorfile {status} {out}/errors/{status}.http" for status in ERRORS
        ),
        "WATCHER": f'"{sys.executable}" -m bootstrap gateway-watch --dir "{out}"',
    }
    text = (TEMPLATES / "haproxy.cfg").read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    return text


ERRORS = {
    400: ("Bad Request", "the request is malformed, or its headers are too large"),
    408: ("Request Timeout", "the request did not arrive in time"),
    500: ("Internal Server Error", "the gateway failed"),
    502: ("Bad Gateway", "the service answered with something that is not HTTP"),
    503: ("Service Unavailable", "the service is unavailable; try again shortly"),
    504: ("Gateway Timeout", "the service did not answer in time"),
}
"""The answers HAProxy makes itself, as problem+json like every other answer."""


DOCS_ASSETS = "/api-docs/assets/" + ASSETS_PATH.removeprefix("/schema/assets/")
"""Where the docs page loads Swagger UI from: the gateway sends it to a service's
`/schema/assets/` (runtime/apidocs.py), every service serving the same bundled files."""


def docs_page(documents: dict[str, Any]) -> str:
    """The `/api-docs` page: Swagger UI over every OpenAPI document, with a link to each
    document (the AsyncAPI ones too)."""
    openapi = [name for name, document in documents.items() if "openapi" in document]
    others = [name for name in documents if name not in openapi]
    page = (TEMPLATES / "docs.html").read_text()
    for key, value in {
        "ASSETS": DOCS_ASSETS,
        "SERVICES": json.dumps(openapi),
        "ASYNCAPI": json.dumps(others),
    }.items():
        page = page.replace(f"@{key}@", value)
    return page


def _error_page(status: int) -> bytes:
    reason, detail = ERRORS[status]
    body = json.dumps({"status": status, "detail": detail}, separators=(",", ":"))
    retry = "retry-after: 1\r\n" if status == 503 else ""
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/problem+json\r\n"
        f"cache-control: no-store\r\n{retry}connection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n{body}"
    ).encode()


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    os.replace(tmp, path)


def write_config(
    settings: Settings,
    keys: dict[str, bytes],
    documents: dict[str, Any],
    limits: Limits = DEFAULT_LIMITS,
) -> Path:
    """Writes the gateway's files (keys: PEM by kid); returns the path of haproxy.cfg."""
    if not keys:
        raise GatewayConfigError("no public keys to trust")
    for kid in keys:
        if not KID.match(kid):
            raise GatewayConfigError(f"unusable key id {kid!r}")
    out = Path(settings.gateway_dir)
    (out / "keys").mkdir(parents=True, exist_ok=True)
    (out / "docs").mkdir(parents=True, exist_ok=True)
    (out / "errors").mkdir(parents=True, exist_ok=True)
    for status in ERRORS:
        _write(out / "errors" / f"{status}.http", _error_page(status))
    for kid, pem in keys.items():
        _write(out / "keys" / f"{kid}.pem", pem)
    for name, document in documents.items():
        _write(out / "docs" / f"{name}.json", json.dumps(document, separators=(",", ":")).encode())
    _write(out / "docs" / "index.html", docs_page(documents).encode())
    for name in REVOCATION_MAPS:
        (out / name).touch()  # HAProxy needs the file; the watcher owns its content
    candidate = out / "haproxy.cfg.new"
    candidate.write_text(render(settings, keys, documents, limits))
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


REVOKED_SESSIONS = "revoked-sessions.map"
"""`<sid> 1` per revoked session."""
REVOKED_SUBJECTS = "revoked-subjects.map"
"""`<sub> <cutoff>` per revoked subject: its tokens with `iat` <= cutoff are refused."""
REVOCATION_MAPS = (REVOKED_SESSIONS, REVOKED_SUBJECTS)
_MAP_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
"""A key safe in a map file and an admin-socket command (ids are UUIDs)."""
_BATCH = 500


def revocation_maps(revocations: Iterable[Revocation]) -> dict[str, list[str]]:
    """The lines of each revocation map; a key that could not be a token's is left out."""
    maps: dict[str, list[str]] = {name: [] for name in REVOCATION_MAPS}
    for r in revocations:
        if not _MAP_KEY.match(r.key):
            continue
        if r.kind == "session":
            maps[REVOKED_SESSIONS].append(f"{r.key} 1")
        else:
            maps[REVOKED_SUBJECTS].append(f"{r.key} {r.cutoff}")
    return maps


def write_maps(directory: Path, maps: dict[str, list[str]]) -> None:
    """Rewrites the map files, which HAProxy reads when it starts or reloads."""
    for name, lines in maps.items():
        _write(directory / name, "".join(f"{line}\n" for line in lines).encode())


async def push_maps(directory: Path, maps: dict[str, list[str]]) -> None:
    """Replaces each map's entries in the running HAProxy, each map at once (a new version
    filled, then committed), over its admin socket; OSError when HAProxy does not take it."""
    socket = directory / "admin.sock"
    for name, lines in maps.items():
        path = directory / name
        prepared = await _admin(socket, f"prepare map {path}")
        version = prepared.rpartition(":")[2].strip()
        if not prepared.startswith("New version created") or not version.isdigit():
            raise OSError(f"haproxy refused to prepare {name}: {prepared.strip()}")
        for start in range(0, len(lines), _BATCH):
            payload = "\n".join(lines[start : start + _BATCH])
            added = await _admin(socket, f"add map @{version} {path} <<\n{payload}\n")
            if added.strip():
                raise OSError(f"haproxy refused entries of {name}: {added.strip()}")
        committed = await _admin(socket, f"commit map @{version} {path}")
        if committed.strip():
            raise OSError(f"haproxy refused to commit {name}: {committed.strip()}")


async def _admin(socket: Path, command: str) -> str:
    """One command on HAProxy's admin socket, and its whole answer."""
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(socket), 2.0)
    try:
        writer.write(command.encode() + b"\n")
        await writer.drain()
        return (await asyncio.wait_for(reader.read(), 5.0)).decode()
    finally:
        writer.close()
