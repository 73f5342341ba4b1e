"""Billing's gRPC services: BillingService, grpc.health.v1.Health and server reflection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from google.protobuf import descriptor_pool
from grpclib.health.check import ServiceCheck
from grpclib.health.service import Health
from grpclib.reflection.service import ServerReflection

from billing_grpc.api import BillingApi
from billing_grpc.generated.google_proto_descriptor_pool import (
    default_google_proto_descriptor_pool,
)

log = structlog.get_logger(__name__)


class _Pools:
    """Descriptor lookups in billing's generated pool, then the default one (which holds
    grpc.health.v1 and the reflection service), so reflection can describe every service."""

    def __init__(self, *pools: Any):
        self._pools = pools

    def __getattr__(self, name: str) -> Callable[..., Any]:
        def find(*args: Any) -> Any:
            for pool in self._pools:
                try:
                    return getattr(pool, name)(*args)
                except KeyError:
                    continue
            raise KeyError(args)

        return find


def services_of(api: BillingApi, database_check: ServiceCheck) -> list[Any]:
    """BillingService, health (NOT_SERVING while the database is down) and reflection."""
    health = Health({api: [database_check]})
    pools = _Pools(default_google_proto_descriptor_pool, descriptor_pool.Default())
    return ServerReflection.extend([api, health], pool=pools)
