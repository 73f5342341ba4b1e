"""The email claims' key: required where claims are keyed in production, generated locally."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.settings import Settings, SettingsError

PRODUCTION = {
    "CARELOG_ENV": "production",
    "CARELOG_DATABASE_URL": "postgresql://app:secret@db.internal:5432/carelog",
    "CARELOG_KAFKA_BOOTSTRAP": "kafka-1.internal:9093",
    "CARELOG_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
    "CARELOG_KAFKA_USERNAME": "carelog",
    "CARELOG_KAFKA_PASSWORD": "kafka-secret",
    "CARELOG_REDIS_URL": "rediss://:redis-secret@cache.internal:6380/0",
    "CARELOG_JWKS_URL": "https://auth.internal/auth/.well-known/jwks.json",
}
KEY = "0123456789abcdef" * 4


def test_production_has_no_claim_key_unless_given_and_the_command_api_refuses_to_start():
    settings = Settings.from_env(PRODUCTION, stack_secrets=None)
    with pytest.raises(SettingsError, match="CARELOG_CLAIM_KEY is required in production"):
        settings.claim_secret()
    given = Settings.from_env({**PRODUCTION, "CARELOG_CLAIM_KEY": KEY}, stack_secrets=None)
    assert given.claim_secret() == KEY.encode()


def test_a_claim_key_shorter_than_32_characters_is_refused():
    settings = Settings.from_env({**PRODUCTION, "CARELOG_CLAIM_KEY": "short"}, stack_secrets=None)
    with pytest.raises(SettingsError, match="CARELOG_CLAIM_KEY is too short"):
        settings.claim_secret()


def test_development_takes_the_stacks_generated_key_else_a_development_only_one(tmp_path: Path):
    development = {**PRODUCTION, "CARELOG_ENV": "development"}
    fallback = Settings.from_env(development, stack_secrets=tmp_path).claim_secret()
    (tmp_path / "claim.key").write_text(KEY + "\n")
    generated = Settings.from_env(development, stack_secrets=tmp_path).claim_secret()
    assert generated == KEY.encode()
    assert fallback != generated
    assert len(fallback) >= 32
