"""One registry per service: each serves its own series and no other service's, and the README's
"Metrics" tables list exactly those series."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client import generate_latest

from services.common.telemetry import OWNERS, SERVICES, service_registry

README = Path(__file__).resolve().parents[2] / "README.md"


def families(service: str) -> set[str]:
    text = generate_latest(service_registry(service)).decode()
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE relaygate_")}
    # An unlabelled counter or histogram also declares its creation time as a gauge of its own.
    return {name for name in names if not name.endswith("_created")}


def test_each_registry_holds_its_own_series_and_no_other() -> None:
    shown = {service: families(service) for service in SERVICES}
    assert "relaygate_http_requests_total" in shown["relay"]
    assert "relaygate_quota_settle_records_total" in shown["quota"]
    assert "relaygate_logger_consumer_lag" in shown["logger"]
    assert "relaygate_db_reads_total" in shown["auth"]
    for service, names in shown.items():
        for other in SERVICES:
            if other == service:
                continue
            only_other = {n for n in shown[other] if n not in names}
            assert not names & only_other
    assert not shown["relay"] & {n for n in shown["quota"] if n.startswith("relaygate_quota_")}
    assert not shown["auth"] & {n for n in shown["relay"] if n.startswith("relaygate_http_")}


def test_every_registry_has_the_process_series() -> None:
    for service in SERVICES:
        text = generate_latest(service_registry(service)).decode()
        assert "process_cpu_seconds_total" in text and "python_gc_objects_collected_total" in text


def test_every_series_has_an_owner() -> None:
    assert all(OWNERS[name] <= set(SERVICES) and OWNERS[name] for name in OWNERS)


def test_readme_tables_list_each_services_series() -> None:
    text = README.read_text()
    section = text[text.index("## Metrics\n") : text.index("## Performance view\n")]
    for service in SERVICES:
        table = section[section.index(f"### {service}\n") :].split("\n\n", 2)[1]
        listed = set(re.findall(r"^\| `(relaygate_[a-z0-9_]+)`", table, re.M))
        assert listed == families(service), (service, sorted(listed ^ families(service)))
