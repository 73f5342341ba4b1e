"""Observability fixtures: promtool, and a private Prometheus that scrapes the running stack."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.stack import ROOT, base_settings, free_port

PROMETHEUS_DIR = ROOT / "ops" / "prometheus"
NOT_INSTALLED = "Prometheus is not installed: run `ops/local/observe.sh install` (`make test` does)"


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(NOT_INSTALLED)
    return path


def render_config(scrape_interval: str) -> str:
    """ops/prometheus/prometheus.yml with its placeholders filled in, as observe.sh does."""
    gateway_metrics = base_settings().gateway_port + 20  # ops/gateway/generate.py
    return (
        (PROMETHEUS_DIR / "prometheus.yml")
        .read_text()
        .replace("@SCRAPE_INTERVAL@", scrape_interval)
        .replace("@RULES@", str(PROMETHEUS_DIR / "alerts.yml"))
        .replace("@GATEWAY_METRICS_PORT@", str(gateway_metrics))
    )


@dataclass
class Prometheus:
    url: str

    async def get(self, path: str, **params: str) -> dict[str, Any]:
        """The HTTP API's answer (status, data or error)."""
        async with httpx.AsyncClient(base_url=self.url, timeout=10) as client:
            answer: dict[str, Any] = (await client.get(path, params=params)).json()
        return answer

    async def query(self, expr: str) -> dict[str, Any]:
        """An instant query's answer."""
        return await self.get("/api/v1/query", query=expr)

    async def values(self, expr: str) -> list[dict[str, Any]]:
        answer = await self.query(expr)
        assert answer["status"] == "success", f"{expr}: {answer}"
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A Prometheus of this test's own (free port, own data dir) scraping every second."""
    executable = binary("prometheus")
    home: Path = tmp_path_factory.mktemp("prometheus")
    config = home / "prometheus.yml"
    config.write_text(render_config("1s"))
    port = free_port()
    log = (home / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            executable,
            f"--config.file={config}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=home,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError((home / "prometheus.log").read_text()[-3000:])
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError((home / "prometheus.log").read_text()[-3000:])
            time.sleep(0.1)
        yield Prometheus(url)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        log.close()
