"""The master key's accepted forms: 32 bytes in base64 or in hex, nothing else."""

from __future__ import annotations

import base64
import os

import pytest

from runtime.settings import Settings, SettingsError, master_key_bytes
from tests.unit.test_claim_key_settings import PRODUCTION


def test_base64_and_hex_forms_of_one_key_read_the_same():
    key = os.urandom(32)
    assert master_key_bytes(base64.b64encode(key).decode()) == key
    assert master_key_bytes(key.hex()) == key
    assert master_key_bytes(f" {key.hex().upper()}\n") == key


@pytest.mark.parametrize(
    "value",
    [
        base64.b64encode(os.urandom(31)).decode(),
        base64.b64encode(os.urandom(33)).decode(),
        os.urandom(32).hex()[:-1] + "g",
        os.urandom(31).hex(),
        "not a key at all",
    ],
)
def test_other_forms_are_refused_when_the_settings_are_read(value):
    with pytest.raises(ValueError, match="32 bytes in base64"):
        master_key_bytes(value)
    with pytest.raises(SettingsError, match="CARELOG_MASTER_KEY must be 32 bytes"):
        Settings.from_env({**PRODUCTION, "CARELOG_MASTER_KEY": value}, stack_secrets=None)
