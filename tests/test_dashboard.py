"""The Grafana dashboard and alert rules only use metric names the system exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics.server import StatusApp, StatusServer
from scheduler.metrics import start_metrics_server
from tests.metrics_fakes import populated_scheduler_metrics, populated_telemetry

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "gpu-fleet.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DOCS = ROOT / "docs" / "metrics.md"

# Series Prometheus itself attaches to every target.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "offset", "bool", "inf", "nan",
}  # fmt: skip
ROWS = {"Fleet overview", "Per-node GPUs", "Leases", "Usage and earnings", "Attestation",
        "Agent health", "Services (relay)"}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (not functions, labels, keywords, variables)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values, regexes
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    expr = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:ms|s|m|h|d|w|y)?", "", expr)  # numbers, offsets
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        word = match.group()
        rest = expr[match.end() :].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def _exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Sample names from real HTTP scrapes of an agent and a scheduler."""
    server = StatusServer("127.0.0.1:0", StatusApp(populated_telemetry().registry))
    server.start()
    sched = start_metrics_server("127.0.0.1:0", populated_scheduler_metrics())
    try:
        texts = [
            httpx.get("http://{}:{}/metrics".format(*server.address)).text,
            httpx.get(f"http://127.0.0.1:{sched.port}/metrics").text,
        ]
    finally:
        server.stop()
        sched.close()
    names = set(SYNTHETIC)
    for text in texts:
        for family in text_string_to_metric_families(text):
            names.update(sample.name for sample in family.samples)
    return names


def test_metric_name_extraction() -> None:
    """The extractor finds names and skips functions, labels, keywords and variables."""
    expr = (
        'histogram_quantile(0.95, sum by (le) (rate(a_bucket{instance=~"$instance"}[5m])))'
        " / on (gpu) b_total * $price or c unless d offset 10m"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d"}


def test_dashboard_parses_with_expected_rows() -> None:
    """The dashboard is valid JSON with the seven rows and Prometheus queries in every panel."""
    dash = json.loads(DASHBOARD.read_text())
    rows = {p["title"] for p in dash["panels"] if p["type"] == "row"}
    assert rows == ROWS
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], f"panel {panel['title']!r} has no query"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_dashboard_uses_only_exported_metrics(exported: set[str]) -> None:
    """Every metric in every dashboard query appears in a real scrape."""
    dash = json.loads(DASHBOARD.read_text())
    exprs = list(_exprs(dash))
    assert len(exprs) > 40
    unknown = {name: e for e in exprs for name in metric_names(e) if name not in exported}
    assert not unknown, f"dashboard uses metrics nobody exports: {unknown}"


def test_alert_rules_use_only_exported_metrics(exported: set[str]) -> None:
    """Every metric an alert reads appears in a real scrape."""
    rules = yaml.safe_load(ALERTS.read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    unknown = {name: e for e in exprs for name in metric_names(e) if name not in exported}
    assert not unknown, f"alerts use metrics nobody exports: {unknown}"


def test_docs_describe_every_exported_metric(exported: set[str]) -> None:
    """docs/metrics.md names every gpu_* family the agent and scheduler export."""
    docs = DOCS.read_text()
    ours = {
        re.sub(r"_(bucket|sum|count|created)$", "", n)
        for n in exported
        if n.startswith("gpu_") and not n.endswith("_created")
    }
    missing = sorted(n for n in ours if f"`{n}" not in docs)
    assert not missing, f"undocumented metrics: {missing}"
