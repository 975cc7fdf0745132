"""Operations end to end on one deployment with two relays: the live performance view merges both
relays' windows (and hears the logger, quota and auth processes); each service's /metrics lists its own
series and no other's; the dashboard and the rules read only series the running services export."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client import generate_latest

from devinfra.backing import BackingServices
from devinfra.processes import free_ports
from services.common.telemetry import SERVICES, service_registry
from tests.db_fixtures import DbUrls
from tests.e2e.stack import MODEL, Deployment, deploy, fund_user
from tests.monitoring import dashboard_exprs, offered, referenced, rule_exprs


@pytest.fixture(scope="module")
def relays(deployment: Deployment) -> list[str]:
    """The stack's relay and one more, both posting to the same Redis."""
    if len(deployment.relay_urls) < 2:
        deployment.more_relays["relay-extra"] = deployment.stack.add_relay()
    return deployment.relay_urls


def chat(url: str, key: str, *, stream: bool = False) -> None:
    response = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "stream": stream,
        },
        headers={"authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text


def performance(deployment: Deployment) -> dict[str, Any]:
    with deployment.admin() as admin:
        response = admin.get("/admin/v1/performance")
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_performance_view_merges_every_relay(deployment: Deployment, relays: list[str]) -> None:
    _, key = fund_user(deployment, 50_000_000)
    before = performance(deployment)["windows"]["1m"]["requests"]
    for url in relays:
        for _ in range(6):
            chat(url, key)
        for _ in range(2):
            chat(url, key, stream=True)
    sent = 8 * len(relays)
    deadline = time.monotonic() + 20
    while True:
        view = performance(deployment)
        window = view["windows"]["1m"]
        services = sorted({s["service"] for s in view["sources"]})
        # Every process posts each second; the other relay's snapshot is at most a second old.
        heard = services == ["auth", "logger", "quota", "relay"]
        if (window["requests"] - before >= sent and heard) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert window["requests"] - before == sent
    assert services == ["auth", "logger", "quota", "relay"], view["sources"]
    assert view["now"]["relays"] == len(relays)
    latency = window["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"]
    assert 0 < window["overhead_ms"]["p50"] <= latency["p50"]
    assert window["stream_ttfb_ms"]["count"] >= 2 * len(relays)
    assert window["errors"]["count"] == 0
    assert window["requests_per_s"] > 0
    assert view["percentiles"]["relative_error"] <= 0.01
    assert [c["name"] for c in view["now"]["channels"]] == ["fake"]
    assert set(view["windows"]) == {"1m", "5m", "1h"}


def test_performance_view_needs_admin_read(deployment: Deployment) -> None:
    response = httpx.get(f"{deployment.relay_url}/admin/v1/performance", timeout=10)
    assert response.status_code == 401


@pytest.fixture(scope="module")
def metrics_ports() -> dict[str, int]:
    """Where auth, quota and the logger serve /metrics (the relay serves its own on its HTTP port)."""
    return dict(zip(("auth", "quota", "logger"), free_ports(3), strict=True))


@pytest.fixture(scope="module")
def deployment(
    backing: BackingServices,
    migrated_db: DbUrls,
    metrics_ports: dict[str, int],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    """The module's deployment, with a metrics listener on each gRPC service."""
    own_env = {s: {"RELAYGATE_METRICS_LISTEN": f"127.0.0.1:{port}"} for s, port in metrics_ports.items()}
    with deploy(backing, migrated_db, tmp_path_factory.mktemp("stack-logs"), own_env=own_env) as running:
        yield running


@pytest.fixture(scope="module")
def metrics_urls(deployment: Deployment, metrics_ports: dict[str, int]) -> dict[str, str]:
    urls = {"relay": f"{deployment.relay_url}/metrics"}
    urls.update({s: f"http://127.0.0.1:{port}/metrics" for s, port in metrics_ports.items()})
    return urls


def ours(names: set[str]) -> set[str]:
    return {n for n in names if n.startswith("relaygate_") and not n.endswith("_created")}


def scrape(url: str) -> str:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    return response.text


def test_each_service_lists_its_own_series_only(metrics_urls: dict[str, str]) -> None:
    exported = {service: ours(offered(scrape(url))) for service, url in metrics_urls.items()}
    for service in SERVICES:
        declared = ours(offered(generate_latest(service_registry(service)).decode()))
        assert exported[service] == declared, (service, sorted(exported[service] ^ declared))
    # What is one service's own is absent from the others.
    assert "relaygate_http_requests_total" not in exported["quota"] | exported["auth"] | exported["logger"]
    assert "relaygate_logger_rows_total" not in exported["relay"] | exported["quota"]
    assert "relaygate_quota_rejections_total" not in exported["relay"] | exported["logger"]


def test_dashboard_and_rules_read_series_the_stack_exports(
    deployment: Deployment, metrics_urls: dict[str, str]
) -> None:
    _, key = fund_user(deployment, 50_000_000)
    chat(deployment.relay_url, key)
    chat(deployment.relay_url, key, stream=True)
    exported: set[str] = set()
    for url in metrics_urls.values():
        exported |= offered(scrape(url))
    wanted = referenced(dashboard_exprs()) | referenced(rule_exprs())
    assert wanted <= exported, sorted(wanted - exported)


def test_spend_per_model_counts_what_the_logger_wrote(
    deployment: Deployment, metrics_urls: dict[str, str]
) -> None:
    _, key = fund_user(deployment, 50_000_000)
    chat(deployment.relay_url, key)
    pattern = re.compile(rf'^relaygate_logger_spend_micros_total{{model="{re.escape(MODEL)}"}} (\S+)$', re.M)
    deadline = time.monotonic() + 20
    while True:
        found = pattern.search(scrape(metrics_urls["logger"]))
        if (found and float(found.group(1)) > 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert found is not None and float(found.group(1)) > 0


def test_the_admin_command_line_prints_tables(deployment: Deployment) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "services.cli", "admin"),
            *("--url", deployment.relay_url, "--key", deployment.admin_key, "prices", "list"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "INPUT_PER_MTOK", "OUTPUT_PER_MTOK"]
    row = next(line for line in lines if line.startswith(MODEL))
    assert re.search(r"\d+\.\d{6} \([\d,]+ µ\)", row), row
