"""Benchmark of the gateway: what HAProxy adds to a read, and what logins cost.

    uv run python -m bench.gateway      (against the running `make up` stack)

In one run, on loopback: list-patients through the gateway (:4004) beside the
same request sent straight to the query API (:4003). Latency is measured in
pairs: each connection alternates a gateway request and a direct one, so noise
from anything else on the machine hits both paths alike. Throughput is measured
per path, in alternating rounds. Then login throughput at the auth service
(argon2id is meant to be slow), and list-patients p99 while a login storm runs,
to show the storm cannot starve the other endpoints.
"""

from __future__ import annotations

import asyncio
import os
import time

from auth.config import AuthSettings
from auth.service import DEV_EMAIL, DEV_PASSWORD
from bench.common import main_for
from bench.loadgen import Connection, percentile
from runtime.settings import Settings

CONCURRENCY = 16
"""Connections, each with its own user (the gateway limits rates per user)."""
REQUESTS_PER_CONNECTION = 100
ROUNDS = 3
LOGINS = 40
LOGIN_CONCURRENCY = 4
STORM_CONCURRENCY = 32
PASSWORD = "bench-password-not-secret-1"  # noqa: S105 (bench users of the dev stack)
LIST = "/patients?limit=20"
LOGIN_LIMIT_ATTEMPTS = 15


async def bench_users(
    gateway: str, auth_url: str, count: int, role: str = "analyst"
) -> list[dict[str, str]]:
    """Authorization headers of `count` users of `role` (created once, reused by later runs).

    They log in at the auth service itself: the gateway's per-address login limit is
    for people, and the benchmark measures reads.
    """
    conn = Connection(gateway)
    direct = Connection(auth_url)
    admin = await conn.request(
        "POST", "/auth/login", json_body={"email": DEV_EMAIL, "password": DEV_PASSWORD}
    )
    if admin.status != 200:
        raise RuntimeError(
            f"development admin login failed ({admin.status}): is `make up` running?"
        )
    admin_headers = {"Authorization": f"Bearer {admin.json()['token']}"}
    headers = []
    for i in range(count):
        email = f"bench-{i:02d}@bench.carelog.invalid"
        if role != "analyst":
            email = f"bench-{role}-{i:02d}@bench.carelog.invalid"
        created = await conn.request(
            "POST",
            "/auth/users",
            admin_headers,
            {"email": email, "password": PASSWORD, "role": role},
        )
        if created.status not in (201, 409):
            raise RuntimeError(f"creating a bench user failed: {created.status} {created.body!r}")
        session = await direct.request(
            "POST", "/auth/login", json_body={"email": email, "password": PASSWORD}
        )
        if session.status != 200:
            raise RuntimeError(f"bench user login failed: {session.status} {session.body!r}")
        headers.append({"Authorization": f"Bearer {session.json()['token']}"})
    await conn.close()
    await direct.close()
    return headers


async def _paired(
    gateway: str, direct: str, headers: list[dict[str, str]], per_connection: int
) -> dict[str, list[float]]:
    """Latencies per path, each connection alternating gateway and direct requests."""
    latencies: dict[str, list[float]] = {"gateway": [], "direct": []}
    failures = 0

    async def worker(auth: dict[str, str], first: str) -> None:
        nonlocal failures
        connections = {"gateway": Connection(gateway), "direct": Connection(direct)}
        paths = {"gateway": "/api" + LIST, "direct": LIST}
        order = [first, "direct" if first == "gateway" else "gateway"]
        for name in order:  # warm-up
            await connections[name].request("GET", paths[name], auth)
        for _ in range(per_connection):
            for name in order:
                reply = await connections[name].request("GET", paths[name], auth)
                if reply.status != 200:
                    failures += 1
                latencies[name].append(reply.seconds)
        await asyncio.gather(*(c.close() for c in connections.values()))

    await asyncio.gather(
        *(worker(h, "gateway" if i % 2 else "direct") for i, h in enumerate(headers))
    )
    if failures:
        raise RuntimeError(f"{failures} list requests failed during the benchmark")
    return latencies


async def _load(
    base: str, path: str, headers: list[dict[str, str]], per_connection: int
) -> tuple[list[float], float, int]:
    """Latencies of successful requests, the wall time, and how many were not 200."""
    connections = [Connection(base) for _ in headers]
    latencies: list[float] = []
    failures = 0

    async def worker(connection: Connection, auth: dict[str, str]) -> None:
        nonlocal failures
        for _ in range(per_connection):
            reply = await connection.request("GET", path, auth)
            if reply.status == 200:
                latencies.append(reply.seconds)
            else:
                failures += 1

    # Warm the connections (and each service's key cache) outside the measurement.
    await asyncio.gather(
        *(c.request("GET", path, h) for c, h in zip(connections, headers, strict=True))
    )
    start = time.perf_counter()
    await asyncio.gather(*(worker(c, h) for c, h in zip(connections, headers, strict=True)))
    wall = time.perf_counter() - start
    await asyncio.gather(*(c.close() for c in connections))
    return latencies, wall, failures


async def _logins(auth_url: str, email: str, count: int, concurrency: int) -> tuple[float, float]:
    """Logins per second and p50 seconds at the auth service itself."""
    latencies: list[float] = []
    per_worker = count // concurrency

    async def worker() -> None:
        connection = Connection(auth_url)
        for _ in range(per_worker):
            reply = await connection.request(
                "POST", "/auth/login", json_body={"email": email, "password": PASSWORD}
            )
            if reply.status != 200:
                raise RuntimeError(f"login failed during the benchmark: {reply.status}")
            latencies.append(reply.seconds)
        await connection.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - start), percentile(latencies, 0.5)


async def _storm(auth_url: str, stop: asyncio.Event) -> dict[int, int]:
    """Wrong-password logins at the auth service, as fast as it answers, until `stop`."""
    outcomes: dict[int, int] = {}

    async def worker(i: int) -> None:
        connection = Connection(auth_url)
        while not stop.is_set():
            reply = await connection.request(
                "POST",
                "/auth/login",
                json_body={"email": f"storm-{i}@bench.carelog.invalid", "password": "wrong"},
            )
            outcomes[reply.status] = outcomes.get(reply.status, 0) + 1
        await connection.close()

    await asyncio.gather(*(worker(i) for i in range(STORM_CONCURRENCY)))
    return outcomes


async def _gateway_login_limit(gateway: str) -> dict[int, int]:
    connection = Connection(gateway)
    outcomes: dict[int, int] = {}
    for _ in range(LOGIN_LIMIT_ATTEMPTS):
        reply = await connection.request(
            "POST",
            "/auth/login",
            json_body={"email": f"limit-{os.getpid()}@bench.carelog.invalid", "password": "x"},
        )
        outcomes[reply.status] = outcomes.get(reply.status, 0) + 1
    await connection.close()
    return outcomes


async def run(settings: Settings) -> list[str]:
    """Markdown lines: gateway vs direct list latency, logins/s, and p99 during a login storm."""
    auth = AuthSettings.from_env({**os.environ, "CARELOG_ENV": settings.env})
    gateway = f"http://127.0.0.1:{settings.gateway_port}"
    direct = f"http://127.0.0.1:{settings.ports['read-api']}"
    auth_url = f"http://127.0.0.1:{auth.port}"
    headers = await bench_users(gateway, auth_url, CONCURRENCY)

    paired = await _paired(gateway, direct, headers, REQUESTS_PER_CONNECTION * ROUNDS)
    throughput = {"direct": 0.0, "gateway": 0.0}
    for _ in range(ROUNDS):
        for name, base, path in (("direct", direct, LIST), ("gateway", gateway, "/api" + LIST)):
            await asyncio.sleep(1.1)  # each user's 1 s rate window starts afresh
            latencies, wall, failures = await _load(base, path, headers, REQUESTS_PER_CONNECTION)
            if failures:
                raise RuntimeError(f"{failures} list requests failed during the benchmark")
            throughput[name] += len(latencies) / wall / ROUNDS
    direct_p99 = percentile(paired["direct"], 0.99)
    gateway_p99 = percentile(paired["gateway"], 0.99)
    direct_p50 = percentile(paired["direct"], 0.5)
    gateway_p50 = percentile(paired["gateway"], 0.5)

    logins_per_second, login_p50 = await _logins(
        auth_url, "bench-00@bench.carelog.invalid", LOGINS, LOGIN_CONCURRENCY
    )

    stop = asyncio.Event()
    storm = asyncio.create_task(_storm(auth_url, stop))
    await asyncio.sleep(1.1)
    during, wall, failures = await _load(gateway, "/api" + LIST, headers, REQUESTS_PER_CONNECTION)
    stop.set()
    outcomes = await storm
    limited = await _gateway_login_limit(gateway)

    total = CONCURRENCY * REQUESTS_PER_CONNECTION * ROUNDS
    return [
        "## Gateway",
        "",
        f"`uv run python -m bench.gateway`; loopback, {os.cpu_count()} CPUs. "
        f"GET list-patients (`limit=20`), {CONCURRENCY} keep-alive connections (one user each). "
        f"Latency: {total} requests per path, each connection alternating gateway and direct. "
        f"Throughput: {total} requests per path in {ROUNDS} alternating rounds. Same run.",
        "",
        "| path | p50 ms | p99 ms | req/s |",
        "| --- | --- | --- | --- |",
        f"| direct to the query API :4003 | {direct_p50 * 1000:.2f} | {direct_p99 * 1000:.2f} "
        f"| {throughput['direct']:.0f} |",
        f"| through the gateway :4004 (JWT check, rate limit, route) | "
        f"{gateway_p50 * 1000:.2f} | {gateway_p99 * 1000:.2f} | {throughput['gateway']:.0f} |",
        f"| through the gateway, during a {STORM_CONCURRENCY}-way login storm | "
        f"{percentile(during, 0.5) * 1000:.2f} | {percentile(during, 0.99) * 1000:.2f} "
        f"| {len(during) / wall:.0f} |",
        "",
        f"Gateway overhead: p99 {100 * (gateway_p99 / direct_p99 - 1):+.0f}% "
        f"(aim: at most +30%), p50 {1000 * (gateway_p50 - direct_p50):+.2f} ms.",
        "",
        f"Logins (argon2id, at the auth service, {LOGIN_CONCURRENCY} at a time): "
        f"{logins_per_second:.1f}/s, p50 {login_p50 * 1000:.0f} ms. "
        f"Login storm ({STORM_CONCURRENCY} connections sending wrong passwords straight to "
        f"the auth service while the reads above ran): answers {_counts(outcomes)}.",
        f"The gateway's login limit: {LOGIN_LIMIT_ATTEMPTS} quick attempts on one account "
        f"from one address answer {_counts(limited)}.",
    ]


def _counts(outcomes: dict[int, int]) -> str:
    return ", ".join(f"{n} x {status}" for status, n in sorted(outcomes.items()))


def main() -> None:
    main_for(run)


if __name__ == "__main__":
    main()
