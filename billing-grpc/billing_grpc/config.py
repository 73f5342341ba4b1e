"""Billing's own settings, read from the environment when the process starts.

The shared ones (database, Kafka, topic prefix, mode) come from `runtime.settings.Settings`.
None of these is a secret, so each has a default in every mode.

CARELOG_BILLING_GRPC_PORT   the gRPC port (9001)
CARELOG_BILLING_HTTP_PORT   health and metrics over HTTP (4001)
CARELOG_BILLING_CURRENCY    the currency of accounts opened from events (GBP)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated

import msgspec

from runtime.settings import Port, load

_Positive = Annotated[int, msgspec.Meta(ge=1)]


class BillingConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where billing listens and how it keeps its state (the `billing` schema)."""

    grpc_port: Port = 9001
    http_port: Port = 4001
    currency: Annotated[str, msgspec.Meta(pattern="^[A-Z]{3}$")] = "GBP"
    """The currency of an account opened by PatientRegistered (which carries none)."""
    consumer_group: str = "carelog-billing"
    pool_size: _Positive = 8

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BillingConfig:
        return load(cls, os.environ if environ is None else environ, _NAMES)


_NAMES = {
    "grpc_port": "CARELOG_BILLING_GRPC_PORT",
    "http_port": "CARELOG_BILLING_HTTP_PORT",
    "currency": "CARELOG_BILLING_CURRENCY",
}
