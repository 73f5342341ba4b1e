"""Billing's own settings, read from the environment when the process starts.

The shared ones (database, Kafka, topic prefix, mode) come from `runtime.settings.Settings`.
None of these is a secret, so each has a default in every mode.

CARELOG_BILLING_GRPC_PORT   the gRPC port (9001)
CARELOG_BILLING_HTTP_PORT   health and metrics over HTTP (4001)
CARELOG_BILLING_CURRENCY    the currency of accounts opened from events (GBP)
CARELOG_BILLING_SCHEMA      the PostgreSQL schema that holds billing's state (billing)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

import msgspec

from runtime.settings import Port, SettingsError, load

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")


@dataclass(frozen=True)
class BillingConfig:
    """Where billing listens and how it keeps its state."""

    grpc_port: int = 9001
    http_port: int = 4001
    currency: str = "GBP"
    """The currency of an account opened by PatientRegistered (which carries none)."""
    schema: str = "billing"
    consumer_group: str = "carelog-billing"
    pool_size: int = 8

    def __post_init__(self) -> None:
        if not _IDENTIFIER.match(self.schema):
            raise SettingsError("CARELOG_BILLING_SCHEMA must be a lower-case SQL identifier")
        if not _CURRENCY.match(self.currency):
            raise SettingsError("CARELOG_BILLING_CURRENCY must be an ISO 4217 code, e.g. GBP")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BillingConfig:
        read = load(_FromEnv, os.environ if environ is None else environ, _NAMES)
        return cls(
            grpc_port=read.grpc_port,
            http_port=read.http_port,
            currency=read.currency,
            schema=read.schema,
        )


class _FromEnv(msgspec.Struct, frozen=True, kw_only=True):
    grpc_port: Port = 9001
    http_port: Port = 4001
    currency: Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")] = "GBP"
    schema: Annotated[str, msgspec.Meta(pattern="^[a-z_][a-z0-9_]{0,62}$")] = "billing"


_NAMES = {
    "grpc_port": "CARELOG_BILLING_GRPC_PORT",
    "http_port": "CARELOG_BILLING_HTTP_PORT",
    "currency": "CARELOG_BILLING_CURRENCY",
    "schema": "CARELOG_BILLING_SCHEMA",
}
