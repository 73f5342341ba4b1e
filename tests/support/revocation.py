"""Test support for revocation: an isolated auth service, command and query APIs, and
optionally a gateway of their own (HAProxy with its revocation watcher), all real
processes on an isolated database. The shared stack's gateway is never touched."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bootstrap.gateway import write_config
from ops.gateway.generate import DEFAULT_LIMITS, Limits, haproxy_binary
from runtime.settings import Settings
from tests.support.stack import Process, env_for, free_port, isolated_settings, stop_group
from tests.support.tokens import auth_settings

WITHIN_SECONDS = 2.0
"""How soon a revocation must be in force everywhere."""


@dataclass
class Stack:
    settings: Settings
    auth: str
    commands: str
    queries: str
    gateway: str | None = None
    gateway_log: Path | None = None
    gateway_process: subprocess.Popen[bytes] | None = None


@contextmanager
def revocation_stack(
    tmp: Path,
    gateway: bool = False,
    limits: Limits = DEFAULT_LIMITS,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[Stack]:
    """Auth, commands and read-api (and a gateway with these rates, if asked) on a database
    of their own; `extra_env` adds settings to their environment."""
    with isolated_settings("rv") as base:
        settings = base.with_(
            ports={**base.ports, "auth": free_port()},
            gateway_dir=str(tmp / "gateway"),
            gateway_port=free_port(),
        )
        auth_url = f"http://127.0.0.1:{settings.ports['auth']}"
        keys = tmp / "keys"
        settings = settings.with_(jwks_url=f"{auth_url}/auth/.well-known/jwks.json")
        env = {
            "CARELOG_AUTH_PORT": str(settings.ports["auth"]),
            "CARELOG_AUTH_KEYS_DIR": str(keys),
            "CARELOG_JWKS_URL": settings.jwks_url,
            "CARELOG_GATEWAY_DIR": settings.gateway_dir,
            "CARELOG_GATEWAY_PORT": str(settings.gateway_port),
            **(extra_env or {}),
        }
        started: list[Process] = []
        haproxy: subprocess.Popen[bytes] | None = None
        try:
            for args, port in (
                (["serve", "auth"], "auth"),
                (["serve", "commands"], "commands"),
                (["serve", "read-api"], "read-api"),
            ):
                process = Process(args, settings, port, tmp / port, env=env)
                started.append(process)
                process.start()
            stack = Stack(
                settings,
                auth_url,
                f"http://127.0.0.1:{settings.ports['commands']}",
                f"http://127.0.0.1:{settings.ports['read-api']}",
            )
            if gateway:
                haproxy = _start_gateway(settings, keys, {**env_for(settings), **env}, tmp, limits)
                stack.gateway = f"http://127.0.0.1:{settings.gateway_port}"
                stack.gateway_log = tmp / "gateway.log"
                stack.gateway_process = haproxy
            yield stack
        finally:
            if haproxy is not None:
                stop_group(haproxy)  # the master, its workers and the watcher
            for process in reversed(started):
                process.stop()


def _start_gateway(
    settings: Settings, keys: Path, env: dict[str, str], tmp: Path, limits: Limits
) -> subprocess.Popen[bytes]:
    config = write_config(settings, auth_settings(keys), limits=limits)
    log = tmp / "gateway.log"
    directory = Path(settings.gateway_dir)
    process = subprocess.Popen(
        [haproxy_binary(), "-W", "-db", "-f", str(config), "-p", str(directory / "haproxy.pid")],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=directory,
        start_new_session=True,  # its group: the master, its workers and the watcher
    )
    deadline = time.monotonic() + 60
    ready = False
    while time.monotonic() < deadline and not ready:
        if process.poll() is not None:
            raise RuntimeError(f"haproxy exited: {log.read_text()[-3000:]}")
        try:
            url = f"http://127.0.0.1:{settings.gateway_port}/health/ready"
            ready = httpx.get(url, timeout=1).status_code == 200
        except httpx.HTTPError:
            pass
        # The watcher has followed the revocations once (its log goes to the gateway's).
        ready = ready and "revocations loaded" in log.read_text()
        if not ready:
            time.sleep(0.1)
    if not ready:
        stop_group(process)
        raise TimeoutError(f"gateway not ready: {log.read_text()[-3000:]}")
    return process


async def status_within(
    request: Callable[[], Awaitable[httpx.Response]],
    expected: int,
    detail: str | None = None,
    seconds: float = WITHIN_SECONDS,
) -> httpx.Response:
    """Repeats `request` until it answers `expected` (with this problem `detail`, if given)
    or `seconds` have passed; the last answer (the caller asserts on it)."""
    deadline = time.monotonic() + seconds
    while True:
        response = await request()
        if response.status_code == expected and (
            detail is None or response.json().get("detail") == detail
        ):
            return response
        if time.monotonic() >= deadline:
            return response
        await asyncio.sleep(0.05)


@contextmanager
def projected_stack(home: Path) -> Iterator[Stack]:
    """`revocation_stack` with a gateway, plus the relay and the directory projection, so
    that what is written through the gateway can be read back through it."""
    with revocation_stack(home, gateway=True) as up:
        relay = Process(["relay"], up.settings, "relay", home / "relay").start()
        projection = Process(
            ["project", "directory"], up.settings, "projection", home / "projection"
        ).start()
        try:
            yield up
        finally:
            projection.stop()
            relay.stop()
