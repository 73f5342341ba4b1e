"""The alert rules check, and behave as ops/prometheus/alerts_test.yml says on synthetic series."""

from __future__ import annotations

import subprocess

from tests.observability.conftest import PROMETHEUS_DIR, binary, render_config


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *args],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_alert_rules_are_valid():
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_alerts_fire_and_stay_quiet_as_their_unit_tests_say():
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test():
    rules = (PROMETHEUS_DIR / "alerts.yml").read_text()
    tests = (PROMETHEUS_DIR / "alerts_test.yml").read_text()
    alerts = [line.split(":", 1)[1].strip() for line in rules.splitlines() if "- alert:" in line]
    assert alerts
    untested = [a for a in alerts if f"alertname: {a}\n" not in tests]
    assert not untested


def test_the_rendered_scrape_config_is_valid(tmp_path):
    config = tmp_path / "prometheus.yml"
    config.write_text(render_config("15s"))
    checked = promtool("check", "config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
