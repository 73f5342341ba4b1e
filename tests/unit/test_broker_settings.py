"""How Kafka and Redis are reached: production refuses clients that authenticate to nothing,
and every Kafka client is made from the same options."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from faststream.security import SASLScram256, SASLScram512

from runtime.kafka import broker_security, client_options
from runtime.settings import Settings, SettingsError

BASE = {
    "CARELOG_DATABASE_URL": "postgresql://app:secret@db.internal:5432/carelog",
    "CARELOG_KAFKA_BOOTSTRAP": "kafka-1.internal:9093,kafka-2.internal:9093",
    "CARELOG_JWKS_URL": "https://auth.internal/auth/.well-known/jwks.json",
}
SECURED = {
    **BASE,
    "CARELOG_ENV": "production",
    "CARELOG_REDIS_URL": "rediss://:redis-secret@cache.internal:6380/0",
    "CARELOG_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "CARELOG_KAFKA_USERNAME": "carelog",
    "CARELOG_KAFKA_PASSWORD": "kafka-secret",
}


def test_production_accepts_sasl_ssl_and_a_redis_password():
    settings = Settings.from_env(SECURED)
    assert settings.kafka_security_protocol == "SASL_SSL"
    assert settings.kafka_sasl_mechanism == "SCRAM-SHA-512"
    assert settings.kafka_username == "carelog"


@pytest.mark.parametrize("protocol", ["PLAINTEXT", "SSL"])
def test_production_refuses_kafka_that_authenticates_no_client(protocol):
    env = {**SECURED, "CARELOG_KAFKA_SECURITY_PROTOCOL": protocol}
    with pytest.raises(SettingsError, match="CARELOG_KAFKA_SECURITY_PROTOCOL"):
        Settings.from_env(env)


def test_production_refuses_kafka_when_the_protocol_is_left_unset():
    env = {k: v for k, v in SECURED.items() if k != "CARELOG_KAFKA_SECURITY_PROTOCOL"}
    with pytest.raises(SettingsError, match="lets any client in"):
        Settings.from_env(env)


@pytest.mark.parametrize(
    "url", ["redis://cache.internal:6379/0", "rediss://cache.internal:6380/0", "redis://user@h/0"]
)
def test_production_refuses_a_redis_url_without_a_password(url):
    with pytest.raises(SettingsError, match="CARELOG_REDIS_URL has no password"):
        Settings.from_env({**SECURED, "CARELOG_REDIS_URL": url})


def test_a_trusted_network_lets_production_run_without_authentication():
    env = {
        **SECURED,
        "CARELOG_REDIS_URL": "redis://cache.internal:6379/0",
        "CARELOG_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
        "CARELOG_TRUSTED_NETWORK": "true",
    }
    settings = Settings.from_env(env)
    assert settings.trusted_network
    assert client_options(settings) == {"bootstrap_servers": BASE["CARELOG_KAFKA_BOOTSTRAP"]}


@pytest.mark.parametrize("missing", ["CARELOG_KAFKA_USERNAME", "CARELOG_KAFKA_PASSWORD"])
def test_sasl_needs_a_user_and_a_password_in_any_mode(missing):
    env = {**SECURED, "CARELOG_ENV": "development", missing: ""}
    with pytest.raises(SettingsError, match="needs CARELOG_KAFKA_USERNAME"):
        Settings.from_env(env, stack_secrets=None)


def test_a_ca_file_needs_a_tls_protocol(tmp_path: Path):
    ca = tmp_path / "ca.pem"
    ca.write_text("unused")
    env = {**SECURED, "CARELOG_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}
    with pytest.raises(SettingsError, match="does not use TLS"):
        Settings.from_env({**env, "CARELOG_KAFKA_CA_FILE": str(ca)})


def test_a_missing_ca_file_is_named(tmp_path: Path):
    env = {**SECURED, "CARELOG_KAFKA_CA_FILE": str(tmp_path / "nowhere.pem")}
    with pytest.raises(SettingsError, match=r"nowhere\.pem"):
        Settings.from_env(env)


def test_unknown_protocols_and_mechanisms_are_refused():
    with pytest.raises(SettingsError, match="one of PLAINTEXT"):
        Settings.from_env({**SECURED, "CARELOG_KAFKA_SECURITY_PROTOCOL": "sasl"})
    with pytest.raises(SettingsError, match="SCRAM-SHA-512"):
        Settings.from_env({**SECURED, "CARELOG_KAFKA_SASL_MECHANISM": "GSSAPI"})


def test_sasl_ssl_clients_verify_the_brokers_against_the_system_trust_store():
    options = client_options(Settings.from_env(SECURED))
    assert options["security_protocol"] == "SASL_SSL"
    assert options["sasl_mechanism"] == "SCRAM-SHA-512"
    assert options["sasl_plain_username"] == "carelog"
    assert options["sasl_plain_password"] == "kafka-secret"
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


def test_the_broker_and_the_clients_get_the_same_security():
    settings = Settings.from_env(
        {**SECURED, "CARELOG_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"}
    ).with_(kafka_sasl_mechanism="SCRAM-SHA-256")
    security = broker_security(settings)
    assert isinstance(security, SASLScram256)
    assert not security.use_ssl
    options = client_options(settings)
    assert options["security_protocol"] == "SASL_PLAINTEXT"
    assert options["sasl_mechanism"] == "SCRAM-SHA-256"
    assert options["ssl_context"] is None


def _stack(tmp_path: Path) -> Path:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "redis.password").write_text("r3dis\n")
    (secrets / "kafka.user").write_text("carelog\n")
    (secrets / "kafka.password").write_text("k4fka\n")
    return secrets


def test_development_defaults_come_from_the_stacks_secrets(tmp_path: Path):
    settings = Settings.from_env({"CARELOG_ENV": "development"}, stack_secrets=_stack(tmp_path))
    assert settings.redis_url == "redis://:r3dis@127.0.0.1:6379/0"
    assert settings.kafka_security_protocol == "SASL_PLAINTEXT"
    assert (settings.kafka_username, settings.kafka_password) == ("carelog", "k4fka")
    assert isinstance(broker_security(settings), SASLScram512)


def test_the_stacks_redis_named_without_a_password_gets_the_stacks(tmp_path: Path):
    """ops/local/dev.env names the stack's Redis without the password generated for it."""
    env = {"CARELOG_ENV": "development", "CARELOG_REDIS_URL": "redis://127.0.0.1:6379/0"}
    settings = Settings.from_env(env, stack_secrets=_stack(tmp_path))
    assert settings.redis_url == "redis://:r3dis@127.0.0.1:6379/0"


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6390/0", "redis://:mine@127.0.0.1:6379/0"])
def test_another_redis_keeps_its_own_url(tmp_path: Path, url: str):
    env = {"CARELOG_ENV": "development", "CARELOG_REDIS_URL": url}
    assert Settings.from_env(env, stack_secrets=_stack(tmp_path)).redis_url == url


def test_development_without_stack_secrets_is_plaintext(tmp_path: Path):
    settings = Settings.from_env({"CARELOG_ENV": "development"}, stack_secrets=tmp_path / "none")
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert settings.kafka_security_protocol == "PLAINTEXT"
    assert broker_security(settings) is None


def test_the_stacks_secrets_are_never_production_defaults(tmp_path: Path):
    env = {k: v for k, v in SECURED.items() if not k.startswith("CARELOG_KAFKA_")}
    env.pop("CARELOG_REDIS_URL")
    with pytest.raises(SettingsError, match="CARELOG_REDIS_URL is required in production"):
        Settings.from_env(env, stack_secrets=_stack(tmp_path))
