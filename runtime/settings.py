"""Typed settings, read from the environment once when a process starts.

Every variable is named `CARELOG_*`. Each area's settings are a frozen msgspec
Struct; `load()` reads one from the environment, converts every value to its
declared type and stops at the first bad one with a single line that names the
variable and the form it expects. Development mode (`CARELOG_ENV=development`)
fills in the local stack's addresses; production mode requires each of them.

| variable | what |
| --- | --- |
| CARELOG_ENV | `development` or `production` (default) |
| CARELOG_DATABASE_URL | PostgreSQL URL (event store, read models, auth and billing) |
| CARELOG_REDIS_URL | Redis URL (directory cache) |
| CARELOG_KAFKA_BOOTSTRAP | Kafka bootstrap servers |
| CARELOG_TOPIC_PREFIX | prefixed to every topic, consumer group and cache key |
| CARELOG_LOG_LEVEL | debug, info (default), warning or error |
| CARELOG_READ_WAIT_SECONDS | how long `minPosition` may wait (5) |
| CARELOG_CACHE_TTL_SECONDS | directory cache lifetime (60) |
| CARELOG_PRACTICE_TIMEZONE | the IANA time zone analytics count days in (Europe/London) |
| CARELOG_HTTP_HOST | the address every service listens on (127.0.0.1) |
| CARELOG_<SERVICE>_PORT | COMMANDS 4000, READ_API 4003, AUTH 4005, RELAY 4010, PROJECTION 4011, |
| | APPOINTMENTS (the appointments projection) 4012, REACTIONS 4013, ANALYTICS 4014, |
| | NOTIFIER 4015 |
| CARELOG_JWKS_URL | where services fetch the keys that verify access tokens |
| CARELOG_AUTH_ISSUER, CARELOG_AUTH_AUDIENCE | `iss` and `aud` of access tokens |
| CARELOG_GATEWAY_DIR | where `carelog gateway-config` writes HAProxy's files |
| CARELOG_GATEWAY_PORT | the gateway's port (4004) |
| CARELOG_GATEWAY_CORS_ORIGINS | space-separated origins CORS allows ("*" in development) |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import msgspec

DEVELOPMENT = "development"
PRODUCTION = "production"

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=3600)]

S = TypeVar("S", bound=msgspec.Struct)


class SettingsError(Exception):
    """A required setting is missing or malformed."""


def env_mode(environ: Mapping[str, str]) -> str:
    """`development` or `production` (the default); SettingsError for anything else."""
    mode = environ.get("CARELOG_ENV", PRODUCTION).strip().lower() or PRODUCTION
    if mode not in (DEVELOPMENT, PRODUCTION):
        raise SettingsError(
            f"CARELOG_ENV={mode!r} is not valid: expected {DEVELOPMENT} or {PRODUCTION}"
        )
    return mode


def _form(annotation: Any) -> str:
    """How a value of this type is written, for error messages."""
    info = msgspec.inspect.type_info(annotation)
    if isinstance(info, msgspec.inspect.LiteralType):
        return "one of " + ", ".join(str(v) for v in info.values)
    if isinstance(info, msgspec.inspect.IntType):
        low, high = info.ge, info.le
        if low is not None and high is not None:
            return f"a whole number from {low} to {high}"
        return "a whole number" + (f" of at least {low}" if low is not None else "")
    if isinstance(info, msgspec.inspect.FloatType):
        return "a number" + (f" from {info.ge} to {info.le}" if info.le is not None else "")
    if isinstance(info, msgspec.inspect.BoolType):
        return "true or false"
    if isinstance(info, (msgspec.inspect.ListType, msgspec.inspect.TupleType)):
        return "a space-separated list"
    if isinstance(info, msgspec.inspect.StrType) and info.pattern:
        return f"text matching {info.pattern}"
    return "text"


def _split(annotation: Any) -> bool:
    origin = get_origin(annotation)
    if origin is Annotated:
        return _split(get_args(annotation)[0])
    return origin in (tuple, list)


def load(
    cls: type[S],
    environ: Mapping[str, str],
    names: Mapping[str, str],
    dev_defaults: Mapping[str, str] | None = None,
    required: frozenset[str] = frozenset(),
    **given: Any,
) -> S:
    """Reads `cls` from `environ`: field → variable by `names`; `given` values win.

    In development mode a missing variable takes its value from `dev_defaults`; in
    production a field in `required` must be set. Types come from `cls`'s fields.
    """
    mode = env_mode(environ)
    hints = {f.name: f.type for f in msgspec.structs.fields(cls)}
    raw: dict[str, Any] = {}
    for field, variable in names.items():
        value = environ.get(variable)
        if not value and mode == DEVELOPMENT and dev_defaults:
            value = dev_defaults.get(variable)
        if not value:
            if field in required:
                raise SettingsError(
                    f"{variable} is required in {mode} mode (set it, or use CARELOG_ENV=development"
                    " in a checkout whose local stack is up: `make up`)"
                )
            continue
        raw[field] = value.split() if _split(hints[field]) else value.strip()
    try:
        for field, value in raw.items():
            msgspec.convert(value, type=hints[field], strict=False)
    except (msgspec.ValidationError, TypeError) as exc:
        variable = names[field]
        raise SettingsError(
            f"{variable}={environ.get(variable, '')!r} is not valid: expected {_form(hints[field])}"
        ) from exc
    try:
        return msgspec.convert({**raw, **given}, type=cls, strict=False)
    except msgspec.ValidationError as exc:
        raise SettingsError(f"settings are not valid: {exc}") from exc


PORT_NAMES = {
    "commands": "CARELOG_COMMANDS_PORT",
    "read-api": "CARELOG_READ_API_PORT",
    "auth": "CARELOG_AUTH_PORT",
    "relay": "CARELOG_RELAY_PORT",
    "projection": "CARELOG_PROJECTION_PORT",
    "appointments": "CARELOG_APPOINTMENTS_PORT",
    "reactions": "CARELOG_REACTIONS_PORT",
    "analytics": "CARELOG_ANALYTICS_PORT",
    "notifier": "CARELOG_NOTIFIER_PORT",
}
DEFAULT_PORTS = {
    "commands": 4000,
    "read-api": 4003,
    "auth": 4005,
    "relay": 4010,
    "projection": 4011,
    "appointments": 4012,
    "reactions": 4013,
    "analytics": 4014,
    "notifier": 4015,
}

_NAMES = {
    "env": "CARELOG_ENV",
    "database_url": "CARELOG_DATABASE_URL",
    "redis_url": "CARELOG_REDIS_URL",
    "kafka_bootstrap": "CARELOG_KAFKA_BOOTSTRAP",
    "topic_prefix": "CARELOG_TOPIC_PREFIX",
    "log_level": "CARELOG_LOG_LEVEL",
    "read_wait_seconds": "CARELOG_READ_WAIT_SECONDS",
    "cache_ttl_seconds": "CARELOG_CACHE_TTL_SECONDS",
    "practice_timezone": "CARELOG_PRACTICE_TIMEZONE",
    "http_host": "CARELOG_HTTP_HOST",
    "jwks_url": "CARELOG_JWKS_URL",
    "jwt_issuer": "CARELOG_AUTH_ISSUER",
    "jwt_audience": "CARELOG_AUTH_AUDIENCE",
    "gateway_dir": "CARELOG_GATEWAY_DIR",
    "gateway_port": "CARELOG_GATEWAY_PORT",
    "cors_origins": "CARELOG_GATEWAY_CORS_ORIGINS",
}
_DEV_STACK = Path(__file__).resolve().parent.parent / ".stack"
_DEV_DEFAULTS = {
    "CARELOG_DATABASE_URL": "postgresql://carelog:carelog@127.0.0.1:5432/carelog",
    "CARELOG_REDIS_URL": "redis://127.0.0.1:6379/0",
    "CARELOG_KAFKA_BOOTSTRAP": "127.0.0.1:9092",
    "CARELOG_GATEWAY_DIR": str(_DEV_STACK / "gateway"),
    "CARELOG_GATEWAY_CORS_ORIGINS": "*",
}


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Where the process finds its infrastructure and how it behaves."""

    env: Literal["development", "production"] = "production"
    database_url: str
    redis_url: str
    kafka_bootstrap: str
    topic_prefix: str = ""
    """Prefixed to every topic name; lets tests run beside a live stack."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    read_wait_seconds: Seconds = 5.0
    """How long a query API waits for `minPosition` before answering 503."""
    cache_ttl_seconds: Annotated[int, msgspec.Meta(ge=1)] = 60
    practice_timezone: Annotated[
        str, msgspec.Meta(pattern=r"^[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*$")
    ] = "Europe/London"
    """The IANA time zone analytics buckets are counted in."""
    http_host: str = "127.0.0.1"
    ports: dict[str, Port] = msgspec.field(default_factory=lambda: dict(DEFAULT_PORTS))
    """Each service's port by name (commands, read-api, auth, relay, projection, ...)."""
    jwks_url: str
    """Where services fetch the public keys that verify access tokens."""
    jwt_issuer: str = "carelog-auth"
    jwt_audience: str = "carelog-api"
    gateway_dir: str = str(_DEV_STACK / "gateway")
    gateway_port: Port = 4004
    cors_origins: tuple[str, ...] = ()

    @property
    def development(self) -> bool:
        return self.env == DEVELOPMENT

    @property
    def cache_prefix(self) -> str:
        """Redis keys of this environment; the topic prefix keeps test runs apart."""
        return f"carelog:{self.topic_prefix}"

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def with_(self, **changes: Any) -> Settings:
        return msgspec.structs.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        source = os.environ if environ is None else environ
        ports = {
            name: _port(source, variable, DEFAULT_PORTS[name])
            for name, variable in PORT_NAMES.items()
        }
        development = dict(_DEV_DEFAULTS)
        development["CARELOG_JWKS_URL"] = (
            f"http://127.0.0.1:{ports['auth']}/auth/.well-known/jwks.json"
        )
        return load(
            cls,
            source,
            _NAMES,
            dev_defaults=development,
            required=frozenset({"database_url", "redis_url", "kafka_bootstrap", "jwks_url"}),
            ports=ports,
        )


def _port(environ: Mapping[str, str], variable: str, default: int) -> int:
    value = environ.get(variable, "").strip()
    if not value:
        return default
    try:
        return msgspec.convert(value, type=Port, strict=False)
    except msgspec.ValidationError:
        raise SettingsError(f"{variable}={value!r} is not valid: expected {_form(Port)}") from None


def read_env_file(path: Path) -> dict[str, str]:
    """`KEY=VALUE` lines of a dotenv-style file (comments and blank lines skipped)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values
