"""Writes carelog's Grafana dashboards (ops/grafana/dashboards/*.json) from the panels below.

Run `uv run python -m ops.grafana.build` after changing a panel; a test checks the JSON
files match this module, and runs every panel's query against a Prometheus that scrapes
the running stack. Each query answers even when nothing has happened yet (`or vector(0)`
where a series appears only with its first event), so an empty panel means a broken
query, not a quiet system.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DASHBOARDS = Path(__file__).parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "carelog-prometheus"}
"""The datasource of provisioning/datasources.yml, by its fixed uid."""

RATE = "[5m]"


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[tuple[str, str], ...]
    """(PromQL, legend) pairs."""
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""


def q(expr: str, legend: str = "") -> tuple[str, str]:
    return (expr, legend)


def http_5xx_ratio() -> str:
    total = f"sum by (app_name) (rate(carelog_http_requests_total{RATE}))"
    errors = f'sum by (app_name) (rate(carelog_http_requests_total{{status_code=~"5.."}}{RATE}))'
    return f"({errors} or {total} * 0) / {total}"


def latency(quantile: float, metric: str, by: str) -> str:
    return f"histogram_quantile({quantile}, sum by ({by}, le) (rate({metric}_bucket{RATE})))"


SERVICES = (
    Panel(
        "Targets up",
        (q("up", "{{job}}"),),
        kind="stat",
        description="1 when Prometheus scraped the process's /metrics.",
    ),
    Panel(
        "Requests per second, by service",
        (q(f"sum by (app_name) (rate(carelog_http_requests_total{RATE}))", "{{app_name}}"),),
        unit="reqps",
    ),
    Panel("5xx ratio, by service", (q(http_5xx_ratio(), "{{app_name}}"),), unit="percentunit"),
    Panel(
        "5xx per second, by route",
        (
            q(
                "sum by (app_name, method, path, status_code) "
                f'(rate(carelog_http_requests_total{{status_code=~"5.."}}{RATE})) or vector(0)',
                "{{app_name}} {{method}} {{path}} {{status_code}}",
            ),
        ),
        unit="reqps",
    ),
    Panel(
        "Latency p50 / p95 / p99, by service",
        tuple(
            q(
                latency(p, "carelog_http_request_duration_seconds", "app_name"),
                f"{{{{app_name}}}} p{n}",
            )
            for p, n in ((0.5, 50), (0.95, 95), (0.99, 99))
        ),
        unit="s",
    ),
    Panel(
        "Commands, by outcome",
        (
            q(
                f"sum by (command, outcome) (rate(carelog_commands_total{RATE}))",
                "{{command}} {{outcome}}",
            ),
        ),
        unit="ops",
    ),
    Panel(
        "Query API cache",
        (
            q(
                f"sum by (kind, outcome) (rate(carelog_read_cache_total{RATE})) or vector(0)",
                "{{kind}} {{outcome}}",
            ),
            q(
                f"sum by (reason) (rate(carelog_read_cache_skipped_total{RATE})) or vector(0)",
                "skipped {{reason}}",
            ),
        ),
        unit="ops",
    ),
    Panel(
        "Gateway responses, by class",
        (
            q(
                "sum by (code) "
                f'(rate(haproxy_frontend_http_responses_total{{proxy="gateway"}}{RATE}))',
                "{{code}}",
            ),
        ),
        unit="reqps",
    ),
    Panel(
        "Gateway 5xx, by backend",
        (
            q(
                f'sum by (proxy) (rate(haproxy_backend_http_responses_total{{code="5xx"}}{RATE}))',
                "{{proxy}}",
            ),
        ),
        unit="reqps",
    ),
)

PIPELINE = (
    Panel(
        "Events waiting to be published",
        (q("max by (publisher) (carelog_publisher_lag_events)", "{{publisher}}"),),
        description="Alert RelayLagHigh above 1000 for 2 minutes.",
    ),
    Panel(
        "Events published, by topic",
        (q(f"sum by (topic) (rate(carelog_publisher_published_total{RATE}))", "{{topic}}"),),
        unit="ops",
    ),
    Panel(
        "Lag per projection (occurrence to application)",
        (
            q("max by (projection) (carelog_projection_lag_seconds)", "{{projection}}"),
            q("max(carelog_billing_lag_seconds)", "billing"),
        ),
        unit="s",
        description="For each consumer's latest batch. Alerts above 30 s.",
    ),
    Panel(
        "Positions: relay and projections",
        (
            q("max by (publisher) (carelog_publisher_position)", "relay {{publisher}}"),
            q("max by (projection) (carelog_projection_position)", "{{projection}}"),
            q('max(carelog_appointments_projection_position{job="appointments"})', "appointments"),
        ),
    ),
    Panel(
        "Events handled, by consumer",
        (
            q(
                f"sum by (projection, outcome) (rate(carelog_projection_events_total{RATE}))",
                "{{projection}} {{outcome}}",
            ),
            q(
                "sum by (outcome) "
                f"(rate(carelog_appointments_projection_events_total{RATE})) or vector(0)",
                "appointments {{outcome}}",
            ),
            q(
                f"sum by (outcome) (rate(carelog_analytics_projection_events_total{RATE}))",
                "analytics {{outcome}}",
            ),
            q(
                f"sum by (outcome) (rate(carelog_billing_patient_events_total{RATE}))",
                "billing {{outcome}}",
            ),
            q(
                "sum by (outcome) "
                f"(rate(carelog_patient_removal_cancellations_total{RATE})) or vector(0)",
                "reactions {{outcome}}",
            ),
        ),
        unit="ops",
    ),
    Panel(
        "Dead letters since start, by consumer",
        (
            q(
                "sum by (consumer) (carelog_consumer_dead_lettered_total) or vector(0)",
                "{{consumer}}",
            ),
        ),
        kind="stat",
        description="Alert DeadLetters above 0; `carelog dlq` lists and replays them.",
    ),
    Panel(
        "Notifications, by purpose and outcome",
        (
            q(
                f"sum by (purpose, outcome) (rate(carelog_notifications_total{RATE})) or vector(0)",
                "{{purpose}} {{outcome}}",
            ),
        ),
        unit="ops",
    ),
    Panel(
        "Notifications given up in the last hour, by reason",
        (
            q(
                "sum by (reason) (increase(carelog_notifications_given_up_total[1h])) or vector(0)",
                "{{reason}}",
            ),
        ),
        kind="stat",
    ),
)

BILLING = (
    Panel(
        "Patient events applied, by outcome",
        (
            q(
                f"sum by (outcome) (rate(carelog_billing_patient_events_total{RATE}))",
                "{{outcome}}",
            ),
        ),
        unit="ops",
        description="`opened` is an account opened for a registered patient.",
    ),
    Panel(
        "Registration to account opened",
        (q("max(carelog_billing_lag_seconds)", "billing"),),
        unit="s",
        description="For billing's latest batch. Alert BillingAccountsLate above 30 s.",
    ),
    Panel(
        "Billing events waiting in the outbox",
        (q('max(carelog_publisher_lag_events{job="billing"})', "outbox"),),
    ),
    Panel(
        "gRPC calls, by method and code",
        (
            q(
                "sum by (grpc_method, grpc_code) "
                f"(rate(carelog_grpc_requests_total{RATE})) or vector(0)",
                "{{grpc_method}} {{grpc_code}}",
            ),
        ),
        unit="ops",
    ),
    Panel(
        "gRPC latency p95, by method",
        (
            q(
                f"{latency(0.95, 'carelog_grpc_request_seconds', 'grpc_method')} or vector(0)",
                "{{grpc_method}}",
            ),
        ),
        unit="s",
    ),
)

AUTH = (
    Panel(
        "Logins, by outcome",
        (q(f"sum by (outcome) (rate(carelog_logins_total{RATE}))", "{{outcome}}"),),
        unit="ops",
    ),
    Panel(
        "Logins shed (503)",
        (
            q(
                "sum(rate(carelog_http_requests_total"
                f'{{app_name="auth", path="/auth/login", status_code="503"}}{RATE})) or vector(0)',
                "shed",
            ),
        ),
        unit="reqps",
        description="Alert LoginShedding while above 0 for 2 minutes.",
    ),
    Panel(
        "Token refreshes, by outcome",
        (
            q(
                f"sum by (outcome) (rate(carelog_token_refreshes_total{RATE})) or vector(0)",
                "{{outcome}}",
            ),
        ),
        unit="ops",
    ),
    Panel(
        "auth latency p95, by route",
        (
            q(
                "histogram_quantile(0.95, sum by (path, le) "
                f'(rate(carelog_http_request_duration_seconds_bucket{{app_name="auth"}}{RATE})))',
                "{{path}}",
            ),
        ),
        unit="s",
    ),
    Panel(
        "auth responses, by route and status",
        (
            q(
                "sum by (path, status_code) "
                f'(rate(carelog_http_requests_total{{app_name="auth"}}{RATE}))',
                "{{path}} {{status_code}}",
            ),
        ),
        unit="reqps",
    ),
)

BOARDS: dict[str, tuple[str, tuple[Panel, ...]]] = {
    "carelog-services": ("carelog: services (rate, errors, duration)", SERVICES),
    "carelog-pipeline": ("carelog: event pipeline", PIPELINE),
    "carelog-billing": ("carelog: billing", BILLING),
    "carelog-auth": ("carelog: auth", AUTH),
}


def panel_json(panel: Panel, index: int) -> dict[str, Any]:
    width = 12
    out: dict[str, Any] = {
        "id": index + 1,
        "type": panel.kind,
        "title": panel.title,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": width, "x": (index % 2) * width, "y": (index // 2) * 8},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "datasource": DATASOURCE,
                "expr": expr,
                "legendFormat": legend,
            }
            for i, (expr, legend) in enumerate(panel.queries)
        ],
    }
    if panel.description:
        out["description"] = panel.description
    return out


def dashboard(uid: str, title: str, panels: tuple[Panel, ...]) -> dict[str, Any]:
    return {
        "uid": uid,
        "title": title,
        "tags": ["carelog"],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "panels": [panel_json(p, i) for i, p in enumerate(panels)],
    }


def rendered() -> dict[str, str]:
    """File name to JSON text, for every dashboard."""
    return {
        f"{uid}.json": json.dumps(dashboard(uid, title, panels), indent=2) + "\n"
        for uid, (title, panels) in BOARDS.items()
    }


def main() -> None:
    DASHBOARDS.mkdir(exist_ok=True)
    for name, text in rendered().items():
        (DASHBOARDS / name).write_text(text)
        print(f"wrote {DASHBOARDS / name}")


if __name__ == "__main__":
    main()
