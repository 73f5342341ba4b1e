"""The Grafana dashboards: generated from ops/grafana/build.py, and every panel's query
answers against a Prometheus that scrapes the running stack after some traffic."""

from __future__ import annotations

import json
import os
import re
import time
import uuid

import httpx
import pytest

from auth.service import DEV_EMAIL, DEV_PASSWORD
from ops.grafana import build
from tests.observability.conftest import Prometheus, render_config
from tests.support.patients import body
from tests.support.stack import ROOT, eventually

GATEWAY = os.environ.get("CARELOG_GATEWAY_URL", "http://127.0.0.1:4004")
GRAFANA = ROOT / "ops" / "grafana"
HTTP_SERVICES = {"commands", "read-api", "auth"}
"""The Litestar services whose requests carelog_http_* count (billing's HTTP port only
serves health and metrics)."""


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL) for every target of every dashboard file."""
    out = []
    for path in sorted((GRAFANA / "dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                out.append((board["uid"], panel["title"], target["expr"]))
    return out


def scraped_jobs() -> set[str]:
    return set(re.findall(r"job_name: (\S+)", render_config("1s")))


def test_the_dashboard_files_are_what_build_writes():
    files = {p.name: p.read_text() for p in (GRAFANA / "dashboards").glob("*.json")}
    assert files == build.rendered(), "run `uv run python -m ops.grafana.build`"


def test_every_panel_has_a_query_and_names_the_provisioned_datasource():
    datasource = (GRAFANA / "provisioning" / "datasources" / "carelog.yml").read_text()
    assert f"uid: {build.DATASOURCE['uid']}" in datasource
    for path in (GRAFANA / "dashboards").glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            assert panel["targets"], panel["title"]
            assert panel["datasource"] == build.DATASOURCE, panel["title"]


async def make_traffic() -> str:
    """Logs in, registers a patient through the gateway and reads it back; its id."""
    async with httpx.AsyncClient(base_url=GATEWAY, timeout=30) as client:
        login = await client.post(
            "/auth/login", json={"email": DEV_EMAIL, "password": DEV_PASSWORD}
        )
        assert login.status_code == 200, login.text
        headers = {"Authorization": f"Bearer {login.json()['token']}"}
        created = await client.post(
            "/api/patients", json=body(name=f"Obs {uuid.uuid4().hex[:6]}"), headers=headers
        )
        assert created.status_code == 201, created.text
        patient = created.json()
        read = await client.get(
            f"/api/patients/{patient['id']}",
            params={"minPosition": patient["position"]},
            headers=headers,
        )
        assert read.status_code == 200, read.text
        return str(patient["id"])


@pytest.mark.e2e
async def test_every_panel_query_answers_against_the_running_stack(prometheus: Prometheus):
    jobs = scraped_jobs()

    async def all_up() -> bool:
        return {s["metric"]["job"] for s in await prometheus.values("up == 1")} == jobs

    await eventually(all_up, timeout=60, pause=0.5)
    await make_traffic()
    after = time.time()

    async def scraped_twice_since() -> bool:
        # Every target has been scraped at least twice since the traffic.
        stamps = await prometheus.values("timestamp(up)")
        return len(stamps) == len(jobs) and all(float(s["value"][1]) > after + 1 for s in stamps)

    await eventually(scraped_twice_since, timeout=60, pause=0.5)

    queries = panel_queries()
    assert len(queries) > 20
    errors = [
        f"{board} / {title}: {expr}: {answer.get('error')}"
        for board, title, expr in queries
        if (answer := await prometheus.query(expr))["status"] != "success"
    ]
    assert not errors, "\n".join(errors)

    # Some series appear only once the pipeline has handled the traffic (billing's account,
    # the projection's lag): wait for them, within bounds, then name what stayed empty.
    async def empty() -> list[str]:
        return [
            f"{board} / {title}: {expr}"
            for board, title, expr in queries
            if not await prometheus.values(expr)
        ]

    async def none_empty() -> bool:
        return not await empty()

    try:
        await eventually(none_empty, timeout=60, pause=1.0)
    except AssertionError:
        pytest.fail("queries that return nothing:\n" + "\n".join(await empty()))


@pytest.mark.e2e
async def test_every_http_service_reports_its_requests(prometheus: Prometheus):
    await make_traffic()

    async def reporting() -> set[str]:
        found = await prometheus.values("count by (app_name) (carelog_http_requests_total)")
        return {s["metric"]["app_name"] for s in found}

    async def all_reporting() -> bool:
        return await reporting() >= HTTP_SERVICES

    try:
        await eventually(all_reporting, timeout=30, pause=0.5)
    except AssertionError:
        pytest.fail(f"services without request metrics: {HTTP_SERVICES - await reporting()}")


@pytest.mark.e2e
async def test_the_alert_rules_evaluate_without_errors(prometheus: Prometheus):
    async def groups() -> list[dict]:
        answer = await prometheus.get("/api/v1/rules")
        found: list[dict] = answer["data"]["groups"]
        return found if found and all(g["lastEvaluation"][:4] != "0001" for g in found) else []

    loaded = await eventually(groups, timeout=30, pause=0.5)
    rules = [rule for group in loaded for rule in group["rules"]]
    assert len(rules) >= 10
    broken = [f"{r['name']}: {r.get('lastError')}" for r in rules if r["health"] != "ok"]
    assert not broken, broken
