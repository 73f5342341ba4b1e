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
| CARELOG_REDIS_URL | Redis URL (directory cache), password included: |
| | `redis://:PASSWORD@host:6379/0`; TLS: `rediss://:PASSWORD@host:6380/0?ssl_ca_certs=ca.pem`. |
| | Production refuses a URL without a password (unless CARELOG_TRUSTED_NETWORK). Development |
| | default: the local stack's Redis with the password `make up` generated (.stack/secrets) |
| CARELOG_KAFKA_BOOTSTRAP | Kafka bootstrap servers |
| CARELOG_KAFKA_SECURITY_PROTOCOL | PLAINTEXT (default), SASL_PLAINTEXT, SASL_SSL or SSL. |
| | Production refuses PLAINTEXT and SSL, which authenticate no client (unless |
| | CARELOG_TRUSTED_NETWORK). Development default: SASL_PLAINTEXT once `make up` has |
| | generated the stack's credentials |
| CARELOG_KAFKA_SASL_MECHANISM | SCRAM-SHA-512 (default), SCRAM-SHA-256 or PLAIN |
| CARELOG_KAFKA_USERNAME | the SASL user (required with SASL_*); development default: the |
| | stack's, from .stack/secrets/kafka.user |
| CARELOG_KAFKA_PASSWORD | its password; development default: .stack/secrets/kafka.password |
| CARELOG_KAFKA_CA_FILE | PEM file of the CAs that sign the brokers' certificates (SSL, |
| | SASL_SSL); unset: the system's trust store |
| CARELOG_KAFKA_REPLICATION_FACTOR | replicas of each topic the services create (1; 3 on a |
| | cluster whose min.insync.replicas is 2) |
| CARELOG_TRUSTED_NETWORK | `true` lets production reach Kafka and Redis without |
| | authentication, where no untrusted host can reach them (false) |
| CARELOG_TOPIC_PREFIX | prefixed to every topic, consumer group and cache key |
| CARELOG_LOG_LEVEL | debug, info (default), warning or error |
| CARELOG_READ_WAIT_SECONDS | how long `minPosition` may wait (5) |
| CARELOG_CACHE_TTL_SECONDS | directory cache lifetime (60) |
| CARELOG_REDIS_TIMEOUT_SECONDS | longest a Redis connect or call may take (0.25) |
| CARELOG_CACHE_BREAKER_FAILURES | failed cache calls in a row that open its breaker (5) |
| CARELOG_CACHE_BREAKER_RESET_SECONDS | how long an open breaker skips the cache (5) |
| CARELOG_PRACTICE_TIMEZONE | the IANA time zone analytics count days in (Europe/London) |
| CARELOG_HTTP_HOST | the address every service listens on (127.0.0.1) |
| CARELOG_COMMANDS_WORKERS | processes serving the command API (1) |
| CARELOG_READ_API_WORKERS | processes serving the query API (2: reads use every core) |
| CARELOG_AUTH_WORKERS | processes serving the auth service (1) |
| CARELOG_<SERVICE>_PORT | COMMANDS 4000, READ_API 4003, AUTH 4005, RELAY 4010, PROJECTION 4011, |
| | APPOINTMENTS (the appointments projection) 4012, REACTIONS 4013, ANALYTICS 4014, |
| | NOTIFIER 4015 |
| CARELOG_JWKS_URL | where services fetch the keys that verify access tokens |
| CARELOG_AUTH_ISSUER, CARELOG_AUTH_AUDIENCE | `iss` and `aud` of access tokens |
| CARELOG_GATEWAY_DIR | where `carelog gateway-config` writes HAProxy's files |
| CARELOG_AUDIT_SPOOL_DIR | where the query API spools disclosure audit records before they |
| | are stored (docs/auth.md): a local directory that outlives the process (.stack/audit-spool) |
| CARELOG_GATEWAY_PORT | the gateway's port (4004) |
| CARELOG_GATEWAY_UPSTREAMS | space-separated `service=host` pairs naming the host the gateway |
| | reaches commands, read-api and auth on (`commands=commands read-api=read-api auth=auth` in |
| | containers); a service not listed: CARELOG_HTTP_HOST |
| CARELOG_GATEWAY_CORS_ORIGINS | space-separated origins (https://app.example.org) whose pages may |
| | call the API; required by `carelog gateway-config` in production. Development |
| | default: http://localhost and http://127.0.0.1 on ports 4004 (the gateway's own |
| | pages), 3000, 5173 and 8080 (common front-end dev servers). `null` is refused; |
| | `*` (any origin but `null`) only in development |
| CARELOG_CLAIM_KEY | the secret (at least 32 characters; `openssl rand -hex 32`) under which |
| | email claims are keyed (docs/replay.md, "Keyed email claims"). Required by the command |
| | API and `carelog claims rekey` in production; after a change, `carelog db migrate` rekeys. |
| | Development default: .stack/secrets/claim.key (made by `make up`), else a fixed |
| | development-only key |
| CARELOG_MASTER_KEY | 32 random bytes in base64 (`openssl rand -base64 32`) or hex: wraps every |
| | patient's data key (runtime/crypto.py); every process that seals or opens personal data |
| | refuses to start without it in production; losing it loses every |
| | sealed field. Development default: .stack/secrets/master.key, else a fixed key that |
| | protects nothing |
| CARELOG_OTLP_ENDPOINT | base URL of an OTLP/HTTP collector (http://collector:4318) to which |
| | each process exports its trace spans; unset: the standard OTEL_EXPORTER_OTLP_ENDPOINT; |
| | neither: no tracing (see docs/observability.md) |
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin
from urllib.parse import quote, urlsplit, urlunsplit

import msgspec

DEVELOPMENT = "development"
PRODUCTION = "production"

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Seconds = Annotated[float, msgspec.Meta(ge=0, le=3600)]
Workers = Annotated[int, msgspec.Meta(ge=1, le=64)]

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

OTEL_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
"""OpenTelemetry's standard variable, read when CARELOG_OTLP_ENDPOINT is unset."""

_NAMES = {
    "env": "CARELOG_ENV",
    "database_url": "CARELOG_DATABASE_URL",
    "redis_url": "CARELOG_REDIS_URL",
    "kafka_bootstrap": "CARELOG_KAFKA_BOOTSTRAP",
    "kafka_security_protocol": "CARELOG_KAFKA_SECURITY_PROTOCOL",
    "kafka_sasl_mechanism": "CARELOG_KAFKA_SASL_MECHANISM",
    "kafka_username": "CARELOG_KAFKA_USERNAME",
    "kafka_password": "CARELOG_KAFKA_PASSWORD",
    "kafka_ca_file": "CARELOG_KAFKA_CA_FILE",
    "kafka_replication_factor": "CARELOG_KAFKA_REPLICATION_FACTOR",
    "trusted_network": "CARELOG_TRUSTED_NETWORK",
    "topic_prefix": "CARELOG_TOPIC_PREFIX",
    "log_level": "CARELOG_LOG_LEVEL",
    "read_wait_seconds": "CARELOG_READ_WAIT_SECONDS",
    "cache_ttl_seconds": "CARELOG_CACHE_TTL_SECONDS",
    "redis_timeout_seconds": "CARELOG_REDIS_TIMEOUT_SECONDS",
    "cache_breaker_failures": "CARELOG_CACHE_BREAKER_FAILURES",
    "cache_breaker_reset_seconds": "CARELOG_CACHE_BREAKER_RESET_SECONDS",
    "practice_timezone": "CARELOG_PRACTICE_TIMEZONE",
    "http_host": "CARELOG_HTTP_HOST",
    "commands_workers": "CARELOG_COMMANDS_WORKERS",
    "read_api_workers": "CARELOG_READ_API_WORKERS",
    "auth_workers": "CARELOG_AUTH_WORKERS",
    "jwks_url": "CARELOG_JWKS_URL",
    "jwt_issuer": "CARELOG_AUTH_ISSUER",
    "jwt_audience": "CARELOG_AUTH_AUDIENCE",
    "gateway_dir": "CARELOG_GATEWAY_DIR",
    "audit_spool_dir": "CARELOG_AUDIT_SPOOL_DIR",
    "gateway_port": "CARELOG_GATEWAY_PORT",
    "gateway_upstreams": "CARELOG_GATEWAY_UPSTREAMS",
    "cors_origins": "CARELOG_GATEWAY_CORS_ORIGINS",
    "otlp_endpoint": "CARELOG_OTLP_ENDPOINT",
    "claim_key": "CARELOG_CLAIM_KEY",
    "master_key": "CARELOG_MASTER_KEY",
}
_DEV_STACK = Path(__file__).resolve().parent.parent / ".stack"
_SECRETS = _DEV_STACK / "secrets"
DEV_CORS_ORIGINS = tuple(
    f"http://{host}:{port}"
    for port in (4004, 3000, 5173, 8080)
    for host in ("localhost", "127.0.0.1")
)
"""The gateway's own pages and the usual ports of front-end development servers."""
_DEV_DEFAULTS = {
    "CARELOG_DATABASE_URL": "postgresql://carelog:carelog@127.0.0.1:5432/carelog",
    "CARELOG_REDIS_URL": "redis://127.0.0.1:6379/0",
    "CARELOG_KAFKA_BOOTSTRAP": "127.0.0.1:9092",
    "CARELOG_GATEWAY_DIR": str(_DEV_STACK / "gateway"),
    "CARELOG_GATEWAY_CORS_ORIGINS": " ".join(DEV_CORS_ORIGINS),
    # Development only (production has no default): a checkout whose stack predates
    # .stack/secrets/claim.key still starts.
    "CARELOG_CLAIM_KEY": "carelog-development-only-claim-key-not-a-secret",
    # Development only, and only until `make up` has generated .stack/secrets/master.key.
    "CARELOG_MASTER_KEY": "ZGV2ZWxvcG1lbnQtb25seS1ub3QtYS1zZWNyZXQtISE=",
}
CLAIM_KEY_MIN = 32
"""Characters a claim key needs at least (128 bits of hex)."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Where the process finds its infrastructure and how it behaves."""

    env: Literal["development", "production"] = "production"
    database_url: str
    redis_url: str
    kafka_bootstrap: str
    kafka_security_protocol: Literal["PLAINTEXT", "SASL_PLAINTEXT", "SASL_SSL", "SSL"] = "PLAINTEXT"
    """How Kafka clients connect: SASL_* authenticate, *SSL encrypt."""
    kafka_sasl_mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    kafka_username: str = ""
    kafka_password: str = ""
    kafka_ca_file: str = ""
    """CAs (PEM) that sign the brokers' certificates; empty: the system's trust store."""
    kafka_replication_factor: Annotated[int, msgspec.Meta(ge=1, le=16)] = 1
    """Replicas of each topic a service creates: more than min.insync.replicas on a cluster."""
    trusted_network: bool = False
    """Production may reach Kafka and Redis without authentication (a network no one else
    can reach); without it, production refuses to."""
    topic_prefix: str = ""
    """Prefixed to every topic name; lets tests run beside a live stack."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    read_wait_seconds: Seconds = 5.0
    """How long a query API waits for `minPosition` before answering 503."""
    cache_ttl_seconds: Annotated[int, msgspec.Meta(ge=1)] = 60
    redis_timeout_seconds: Annotated[float, msgspec.Meta(ge=0.001, le=60)] = 0.25
    """Socket timeout of each Redis connect and call; a slower cache counts as failed."""
    cache_breaker_failures: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 5
    """Failed cache calls in a row after which reads skip the cache (the breaker opens)."""
    cache_breaker_reset_seconds: Annotated[float, msgspec.Meta(ge=0.01, le=3600)] = 5.0
    """How long an open breaker skips the cache before one read probes it again."""
    practice_timezone: Annotated[
        str, msgspec.Meta(pattern=r"^[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*$")
    ] = "Europe/London"
    """The IANA time zone analytics buckets are counted in."""
    http_host: str = "127.0.0.1"
    commands_workers: Workers = 1
    """Processes serving the command API. Each caches aggregates; the store's version
    check keeps several correct (see commands.store), but one batches commits best."""
    read_api_workers: Workers = 2
    """Processes serving the query API: reads are CPU-bound in Python, one core each."""
    auth_workers: Workers = 1
    ports: dict[str, Port] = msgspec.field(default_factory=lambda: dict(DEFAULT_PORTS))
    """Each service's port by name (commands, read-api, auth, relay, projection, ...)."""
    jwks_url: str
    """Where services fetch the public keys that verify access tokens."""
    jwt_issuer: str = "carelog-auth"
    jwt_audience: str = "carelog-api"
    gateway_dir: str = str(_DEV_STACK / "gateway")
    audit_spool_dir: str = str(_DEV_STACK / "audit-spool")
    """Where the query API's processes append disclosure records before shipping them
    (runtime.audit_spool): local to the host, kept across restarts."""
    gateway_port: Port = 4004
    gateway_upstreams: tuple[str, ...] = ()
    """`service=host` pairs: where the gateway reaches each upstream (default: http_host)."""
    cors_origins: tuple[str, ...] = ()
    """Origins whose pages may call the API through the gateway; `*` in development only."""
    otlp_endpoint: str = ""
    """The OTLP/HTTP collector that receives trace spans; empty: spans are not recorded."""
    claim_key: str = ""
    """The secret email claims are keyed under (`claim_secret()`); empty: not configured."""
    master_key: str = ""
    """Base64 of the 32-byte key that wraps every patient's data key (runtime.crypto)."""

    def __post_init__(self) -> None:
        check_master_key(self.master_key)
        check_cors_origins(self.cors_origins, self.env)
        check_gateway_upstreams(self.gateway_upstreams)
        check_broker_access(self)

    @property
    def development(self) -> bool:
        return self.env == DEVELOPMENT

    @property
    def cache_prefix(self) -> str:
        """Redis keys of this environment; the topic prefix keeps test runs apart."""
        return f"carelog:{self.topic_prefix}"

    def upstream(self, service: str) -> str:
        """The host the gateway reaches `service` on."""
        for pair in self.gateway_upstreams:
            name, _, host = pair.partition("=")
            if name == service:
                return host
        return self.http_host

    def claim_secret(self) -> bytes:
        """The claim key, for the processes that key email claims; SettingsError if unset."""
        variable = _NAMES["claim_key"]
        if not self.claim_key:
            raise SettingsError(
                f"{variable} is required in {self.env} mode: the secret email claims are"
                " keyed under (at least 32 characters, such as `openssl rand -hex 32`)"
            )
        if len(self.claim_key) < CLAIM_KEY_MIN:
            raise SettingsError(
                f"{variable} is too short: expected at least {CLAIM_KEY_MIN} characters"
            )
        return self.claim_key.encode("utf-8")

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    def with_(self, **changes: Any) -> Settings:
        return msgspec.structs.replace(self, **changes)

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, stack_secrets: Path | None = _SECRETS
    ) -> Settings:
        """The settings in `environ` (the process's); in development, the local stack's
        credentials in `stack_secrets` (.stack/secrets, made by `make up`) are defaults."""
        source = os.environ if environ is None else environ
        ports = {
            name: _port(source, variable, DEFAULT_PORTS[name])
            for name, variable in PORT_NAMES.items()
        }
        development = {**_DEV_DEFAULTS, **_stack_credentials(stack_secrets)}
        development["CARELOG_JWKS_URL"] = (
            f"http://127.0.0.1:{ports['auth']}/auth/.well-known/jwks.json"
        )
        if env_mode(source) == DEVELOPMENT:
            source = _with_stack_redis_password(source, development)
        settings = load(
            cls,
            source,
            _NAMES,
            dev_defaults=development,
            required=frozenset({"database_url", "redis_url", "kafka_bootstrap", "jwks_url"}),
            ports=ports,
        )
        if not settings.otlp_endpoint and source.get(OTEL_ENDPOINT, "").strip():
            settings = settings.with_(otlp_endpoint=source[OTEL_ENDPOINT].strip())
        if settings.kafka_ca_file and not Path(settings.kafka_ca_file).is_file():
            raise SettingsError(
                f"{_NAMES['kafka_ca_file']}={settings.kafka_ca_file!r} is not a readable file"
            )
        return settings


MASTER_KEY_FORMS = "32 bytes in base64 (`openssl rand -base64 32`) or hex (`openssl rand -hex 32`)"


def master_key_bytes(value: str) -> bytes:
    """The 32-byte master key from its base64 or hex (64 digits) form; ValueError if it is
    neither."""
    text = value.strip()
    try:
        hexadecimal = len(text) == 64
        key = bytes.fromhex(text) if hexadecimal else base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ValueError(f"must be {MASTER_KEY_FORMS}")
    return key


def check_master_key(value: str) -> None:
    """SettingsError unless the master key is empty (not configured) or in a form
    `master_key_bytes` reads."""
    if not value:
        return
    try:
        master_key_bytes(value)
    except ValueError:
        raise SettingsError(f"{_NAMES['master_key']} must be {MASTER_KEY_FORMS}") from None


_ORIGIN = re.compile(
    r"https?://(\[[0-9a-f:.]+\]|[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*)"
    r"(:[0-9]{1,5})?",
    re.IGNORECASE,
)


def check_cors_origins(origins: tuple[str, ...], env: str) -> None:
    """SettingsError unless each origin is scheme://host[:port], `*` only in development.

    `null` is what sandboxed frames, local files and some redirects send: any site can
    make a browser send it, so allowing it would allow every site.
    """
    variable = _NAMES["cors_origins"]
    for origin in origins:
        if origin.lower() == "null":
            raise SettingsError(f"{variable} may not list 'null': any site can send that origin")
        if origin == "*":
            if env != DEVELOPMENT:
                raise SettingsError(
                    f"{variable}='*' is not allowed in {env} mode: list each origin whose"
                    " pages may call the API, like https://app.example.org"
                )
            continue
        if not _ORIGIN.fullmatch(origin):
            raise SettingsError(
                f"{variable} has {origin!r}: expected origins like https://app.example.org"
                " (scheme, host and an optional port; no path, no trailing slash)"
            )


_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]")
_UPSTREAMS = ("commands", "read-api", "auth")


def check_gateway_upstreams(pairs: tuple[str, ...]) -> None:
    """SettingsError unless each pair is `service=host` for a service behind the gateway."""
    variable = _NAMES["gateway_upstreams"]
    for pair in pairs:
        name, _, host = pair.partition("=")
        if name not in _UPSTREAMS or not _HOST.fullmatch(host):
            raise SettingsError(
                f"{variable} has {pair!r}: expected service=host pairs, the service one of"
                f" {', '.join(_UPSTREAMS)} (like commands=commands.carelog.svc)"
            )


def check_broker_access(settings: Settings) -> None:
    """SettingsError for Kafka or Redis settings that cannot work, or that production refuses:
    a Kafka protocol that authenticates no client, a Redis URL without a password."""
    protocol = _NAMES["kafka_security_protocol"]
    sasl = settings.kafka_security_protocol.startswith("SASL_")
    if sasl and not (settings.kafka_username and settings.kafka_password):
        raise SettingsError(
            f"{protocol}={settings.kafka_security_protocol} needs {_NAMES['kafka_username']}"
            f" and {_NAMES['kafka_password']}"
        )
    if settings.kafka_ca_file and not settings.kafka_security_protocol.endswith("SSL"):
        raise SettingsError(
            f"{_NAMES['kafka_ca_file']} is set but {protocol}="
            f"{settings.kafka_security_protocol} does not use TLS (SSL or SASL_SSL)"
        )
    redis = urlsplit(settings.redis_url)
    if redis.scheme not in ("redis", "rediss", "unix"):
        raise SettingsError(f"{_NAMES['redis_url']} must be a redis://, rediss:// or unix:// URL")
    if settings.env != PRODUCTION or settings.trusted_network:
        return
    opt_out = f"(or set {_NAMES['trusted_network']}=true where no untrusted host can reach it)"
    if not sasl:
        raise SettingsError(
            f"{protocol}={settings.kafka_security_protocol} lets any client in: production"
            f" needs SASL_SSL (or SASL_PLAINTEXT) with a user and password {opt_out}"
        )
    if not redis.password:
        raise SettingsError(
            f"{_NAMES['redis_url']} has no password: production needs"
            f" redis://:PASSWORD@host:port/db (rediss:// for TLS) {opt_out}"
        )


def _stack_credentials(secrets: Path | None) -> dict[str, str]:
    """Development defaults from the local stack's .stack/secrets, once `make up` made them."""

    def secret(name: str) -> str:
        try:
            return (secrets / name).read_text().strip() if secrets else ""
        except OSError:
            return ""

    defaults: dict[str, str] = {}
    password = secret("redis.password")
    if password:
        defaults["CARELOG_REDIS_URL"] = _with_password(_DEV_DEFAULTS["CARELOG_REDIS_URL"], password)
    claim_key = secret("claim.key")
    if claim_key:
        defaults["CARELOG_CLAIM_KEY"] = claim_key
    master = secret("master.key")
    if master:
        defaults["CARELOG_MASTER_KEY"] = master
    user, password = secret("kafka.user"), secret("kafka.password")
    if user and password:
        defaults["CARELOG_KAFKA_SECURITY_PROTOCOL"] = "SASL_PLAINTEXT"
        defaults["CARELOG_KAFKA_USERNAME"] = user
        defaults["CARELOG_KAFKA_PASSWORD"] = password
    return defaults


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f":{quote(password, safe='')}@{parts.netloc}"))


def _with_stack_redis_password(
    environ: Mapping[str, str], development: Mapping[str, str]
) -> Mapping[str, str]:
    """ops/local/dev.env names the stack's Redis without its password (that is generated
    per checkout): a URL that names that Redis, and no password, gets the stack's."""
    variable = _NAMES["redis_url"]
    given, stack = environ.get(variable, ""), development.get(variable, "")
    if not given or not stack:
        return environ
    mine, theirs = urlsplit(given), urlsplit(stack)
    if mine.password or not theirs.password or mine.scheme != theirs.scheme:
        return environ
    if (mine.hostname, mine.port) != (theirs.hostname, theirs.port):
        return environ
    return {**environ, variable: _with_password(given, theirs.password)}


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
