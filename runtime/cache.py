"""The one way a process makes a Redis client: from its settings.

CARELOG_REDIS_URL carries the address, the password and, for `rediss://`, the TLS options
(`?ssl_ca_certs=...`); making every client here keeps a client from being made without
them. Nothing connects until the first command.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from runtime.settings import Settings


def redis_for(settings: Settings, **options: Any) -> Redis:
    """An asyncio Redis client for the settings' Redis; `options` tune its connections."""
    return Redis.from_url(settings.redis_url, **options)
