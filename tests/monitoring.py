"""The series names the monitoring component (deploy/k8s/components/monitoring) reads, and the names a
Prometheus exposition text offers, for checking one against the other."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

MONITORING = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "components" / "monitoring"
RULES = MONITORING / "rules" / "relaygate.rules.yml"
DASHBOARD = MONITORING / "dashboards" / "relaygate-overview.json"

# Our series are relaygate_*; recording rules are relaygate:* and never match this.
_SERIES = re.compile(r"\brelaygate_[a-z0-9_]+")
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def referenced(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in _SERIES.findall(expr)}


def offered(exposition: str) -> set[str]:
    """Every name a query could select from ``exposition``, samples or not (a labelled series with no
    child yet is still declared by its HELP and TYPE lines)."""
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names
