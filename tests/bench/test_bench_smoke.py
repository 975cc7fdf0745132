"""The benchmark harness still works: every scenario runs for about a second against a real stack.

This checks that ``python -m bench`` produces numbers, not what the numbers are (CI machines are too
noisy for that); the benchmark itself is run by hand (see bench/README.md).

One ``--quick`` run of every scenario serves the whole module: with Node.js and npm on the machine it
runs the Portkey peer beside relaygate (installed into ``~/.cache/relaygate-bench/portkey`` on first
use), so scenarios 1-3 and 9 measure it too; one stack start and one pass over the scenarios instead of
one per test.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

import pytest

from bench.__main__ import main
from devinfra.backing import BackingServices


@dataclass(frozen=True)
class Report:
    document: dict[str, Any]
    markdown: str
    # Why the Portkey peer did not run ("" when it did).
    no_peer: str

    @property
    def scenarios(self) -> dict[int, dict[str, Any]]:
        return {s["number"]: s for s in self.document["scenarios"]}

    @property
    def targets(self) -> dict[str, dict[str, Any]]:
        return {t["target"]: t for t in self.document["targets"]}


def rows(scenario: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {row["target"]: row for row in scenario["median"]}


def few_errors(row: dict[str, Any]) -> bool:
    return bool(row["figures"]["errors"] <= max(1, row["units"] // 100))


def require_wrk() -> None:
    if shutil.which("wrk") is None:
        pytest.fail(
            "wrk is not installed, and the benchmark needs it: apt-get install -y wrk "
            "(bash tests/infra/setup.sh installs it)",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def report(backing: BackingServices, tmp_path_factory: pytest.TempPathFactory) -> Report:
    require_wrk()
    out = tmp_path_factory.mktemp("bench")
    argv = ["--quick", "--no-install", "--out", str(out)]
    no_peer = ""
    if shutil.which("node") is None or shutil.which("npm") is None:
        no_peer = "the Portkey peer needs Node.js and npm (the machine's packages)"
    else:
        argv += ["--peer", "portkey"]

    assert main(argv, backing=backing) == 0

    [json_path] = out.glob("*.json")
    [md_path] = out.glob("*.md")
    return Report(json.loads(json_path.read_text()), md_path.read_text(), no_peer)


def test_every_scenario_produces_numbers(report: Report) -> None:
    scenarios = report.scenarios
    assert sorted(scenarios) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]
    markdown = report.markdown
    for scenario in scenarios.values():
        assert f"### {scenario['number']}. {scenario['title']}" in markdown

    for number in (1, 2):
        for target, row in rows(scenarios[number]).items():
            assert row["figures"]["rps"] > 0, (number, target)
            assert few_errors(row), (number, target, row["figures"])
    # CPU per request is accounted to the relaygate processes from /proc.
    relayed = rows(scenarios[1])["relaygate"]
    assert relayed["cpu_ms_per_unit"]["relay"] > 0
    assert relayed["memory_mb"]["relay"] > 0

    fixed = rows(scenarios[3])
    assert {
        "direct @ 50/s",
        "relaygate @ 50/s",
        "direct stream @ 50/s",
        "relaygate stream @ 50/s",
    } <= fixed.keys()
    assert all(row["units"] > 0 and few_errors(row) for row in fixed.values())
    assert fixed["relaygate stream @ 50/s"]["figures"]["ttfb_p50_ms"] > 0

    for target, row in rows(scenarios[4]).items():
        assert row["figures"]["completed"] == 200, (target, row["figures"])
        assert row["figures"]["server_peak_mb"] > 0

    ingest = rows(scenarios[5])
    assert ingest["relaygate logger"]["figures"]["landed"] == 2000
    assert ingest["relaygate logger"]["figures"]["events_per_s"] > 0
    assert ingest["kafka consume only"]["figures"]["events_per_s"] > 0

    quota = rows(scenarios[6])
    assert quota["reserve + settle"]["figures"]["ops_per_s"] > 0
    assert few_errors(quota["reserve + settle"])

    growth = rows(scenarios[7])
    assert {
        "direct",
        "10 keys, 1 channel",
        "200 keys, 1 channel, first use",
        "200 keys, 1 channel",
        "10 keys, 5 channels",
    } <= growth.keys()
    assert all(row["figures"]["requests"] > 0 for row in growth.values())

    paced = rows(scenarios[9])
    for target in ("direct", "relaygate"):
        assert paced[target]["figures"]["requests"] > 0, target
        assert few_errors(paced[target]), (target, paced[target]["figures"])
    # A stream of 100 chunks 2 ms apart cannot finish in less than 200 ms.
    assert paced["direct"]["figures"]["p50_ms"] >= 200

    # The targets that compare with the peer are reported either way; without it, as not measured.
    targets = report.targets
    assert "### Targets" in markdown
    peer_verdicts = ("not measured",) if report.no_peer else ("met", "not met")
    assert targets["Non-stream, 50 connections: RPS vs portkey"]["verdict"] in peer_verdicts
    assert targets["Non-stream: quota CPU per request"]["verdict"] in ("met", "not met")

    verification = rows(scenarios[8])
    for name in ("VerifyKey over gRPC, cold (database)", "VerifyKey over gRPC", "relay cache hit"):
        assert verification[name]["figures"]["ops_per_s"] > 0, name
        assert verification[name]["figures"]["errors"] == 0, name

    fronts = rows(scenarios[11])
    assert fronts.keys() == {
        "relaygate http",
        "relaygate grpc",
        "relaygate http stream",
        "relaygate grpc stream",
    }
    for target, row in fronts.items():
        assert row["units"] > 0 and few_errors(row), (target, row["figures"])
    assert fronts["relaygate grpc"]["cpu_ms_per_unit"]["relay"] > 0
    assert fronts["relaygate grpc stream"]["figures"]["ttfb_p50_ms"] > 0


def test_portkey_peer_relays_and_is_measured(report: Report) -> None:
    """The Portkey gateway itself, run beside relaygate in the module's bench run."""
    if report.no_peer:
        if os.environ.get("RELAYGATE_REQUIRE_INFRA") == "1":
            pytest.fail(report.no_peer, pytrace=False)
        pytest.skip(f"{report.no_peer} (a failure when RELAYGATE_REQUIRE_INFRA=1)")

    document = report.document
    assert document["meta"]["peer"].startswith("portkey ")
    scenarios = report.scenarios
    for number in (1, 2, 9):
        row = rows(scenarios[number])["portkey"]
        assert row["figures"]["rps"] > 0, number
        assert few_errors(row), (number, row["figures"])
        # Portkey's own process tree is what its gateway CPU column reads.
        assert row["gateway"] == "portkey"
        assert row["cpu_ms_per_unit"]["portkey"] > 0, number
    fixed = rows(scenarios[3])
    assert fixed["portkey @ 50/s"]["units"] > 0 and few_errors(fixed["portkey @ 50/s"])
    assert fixed["portkey stream @ 50/s"]["figures"]["ttfb_p50_ms"] > 0

    targets = report.targets
    assert targets["Non-stream, 50 connections: RPS vs portkey"]["verdict"] in ("met", "not met")
    assert (
        targets["Paced streams (100 chunks, 2 ms apart): deployment CPU per stream vs portkey"]["value"] > 0
    )
