"""promtool, the Prometheus project's own checker, on real scrapes and on the alert rules."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from agent.metrics.server import StatusApp, StatusServer
from scheduler.metrics import start_metrics_server
from tests.conftest import IN_CI
from tests.metrics_fakes import populated_scheduler_metrics, populated_telemetry

PROMETHEUS_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


@pytest.fixture(scope="module")
def promtool() -> str:
    """promtool from Debian's `prometheus` package (make system-deps installs it)."""
    path = shutil.which("promtool")
    if path is None:
        message = "promtool not found: apt-get install prometheus (or make system-deps)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def _promtool(
    promtool: str, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


@pytest.fixture
def agent_url() -> Iterator[str]:
    server = StatusServer("127.0.0.1:0", StatusApp(populated_telemetry().registry))
    server.start()
    yield "http://{}:{}".format(*server.address)
    server.stop()


def test_agent_scrape_passes_promtool_check_metrics(promtool: str, agent_url: str) -> None:
    """A real HTTP scrape of the agent, every family populated, has no lint problems."""
    text = httpx.get(agent_url + "/metrics").text
    assert "gpu_xid_errors_total{" in text  # the scrape really holds GPU series
    result = _promtool(promtool, "check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_scheduler_scrape_passes_promtool_check_metrics(promtool: str) -> None:
    """A real HTTP scrape of the scheduler's registry has no lint problems."""
    server = start_metrics_server("127.0.0.1:0", populated_scheduler_metrics())
    try:
        text = httpx.get(f"http://127.0.0.1:{server.port}/metrics").text
    finally:
        server.close()
    assert "gpu_scheduler_nodes{" in text
    result = _promtool(promtool, "check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "" and result.stderr.strip() == ""


def test_promtool_flags_a_bad_metric(promtool: str) -> None:
    """The check is not vacuous: promtool does report a counter without _total."""
    bad = "# HELP bad_counter x\n# TYPE bad_counter counter\nbad_counter 1\n"
    result = _promtool(promtool, "check", "metrics", stdin=bad)
    assert "_total" in result.stdout + result.stderr


def test_alert_rules_pass_check_rules(promtool: str) -> None:
    """alerts.yml is valid and every expression parses."""
    result = _promtool(promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_rule_unit_tests_pass(promtool: str) -> None:
    """Every alert fires and stays silent where alerts_test.yml says it should."""
    result = _promtool(promtool, "test", "rules", str(PROMETHEUS_DIR / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_unit_tests() -> None:
    """Each alert in alerts.yml appears in alerts_test.yml with a firing and a silent case."""
    import yaml

    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())
    cases = [c for t in tests["tests"] for c in t["alert_rule_test"]]
    for alert in alerts:
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert}: no firing case"
        assert any(not c["exp_alerts"] for c in mine), f"{alert}: no silent case"


def test_scrape_config_is_valid(promtool: str, tmp_path: Path) -> None:
    """The example prometheus.yml (with its rule file) passes promtool check config."""
    shutil.copy(PROMETHEUS_DIR / "prometheus.yml", tmp_path)
    shutil.copy(PROMETHEUS_DIR / "alerts.yml", tmp_path)
    result = _promtool(promtool, "check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
