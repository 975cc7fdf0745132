"""The monitoring component: its rules pass ``promtool check rules`` and their unit tests
(``promtool test rules``), the PrometheusRule carries exactly those rules, the component renders on the
base, and the dashboard and the rules read only series the services declare (the e2e test in
tests/e2e/test_operations.py checks them against a running stack's /metrics)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from services.common.telemetry import SERVICES, service_registry
from tests.deploy.test_manifests import K8S, kubectl
from tests.monitoring import DASHBOARD, MONITORING, RULES, dashboard_exprs, offered, referenced, rule_exprs


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        reason = "promtool is missing (Debian package prometheus; bash tests/infra/setup.sh installs it)"
        if os.environ.get("RELAYGATE_REQUIRE_INFRA") == "1":
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)
    return found


def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_rules_pass_promtool_check() -> None:
    result = run(promtool(), "check", "rules", RULES.name, cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_on_their_unit_test_series() -> None:
    result = run(promtool(), "test", "rules", "relaygate.rules.test.yml", cwd=RULES.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_a_unit_test() -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule}
    tests = yaml.safe_load((RULES.parent / "relaygate.rules.test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])}
    assert alerts == tested


def test_the_prometheus_rule_carries_the_same_rules() -> None:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_the_component_renders_on_the_base(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(K8S / "base", tmp_path)],
                "components": [os.path.relpath(MONITORING, tmp_path)],
            }
        )
    )
    result = run(kubectl(), "kustomize", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    dashboards = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("dashboards")
    ]
    assert len(dashboards) == 1
    assert dashboards[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboards[0]["data"][DASHBOARD.name]) == json.loads(DASHBOARD.read_text())
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "PrometheusRule"] == ["relaygate"]


def test_dashboard_and_rules_read_only_declared_series() -> None:
    declared: set[str] = set()
    for service in SERVICES:
        declared |= offered(generate_latest(service_registry(service)).decode())
    wanted = referenced(dashboard_exprs()) | referenced(rule_exprs())
    assert wanted, "no relaygate_* series found in the dashboard or the rules"
    assert wanted <= declared, sorted(wanted - declared)


def test_dashboard_panels_cover_the_overview() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in (
        "traffic",
        "errors",
        "latency",
        "overhead",
        "first byte",
        "spend",
        "logger",
        "spool",
        "replica",
        "breaker",
    ):
        assert topic in titles, topic
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
