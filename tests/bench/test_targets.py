"""The issue's targets are judged on the right rows, with the right direction and limits."""

from __future__ import annotations

from bench.report import Measurement, Metric, ScenarioResult, TargetCheck
from bench.targets import evaluate


def row(target: str, units: int, cpu_ms: dict[str, float], gateway: str, **figures: float) -> Measurement:
    return Measurement(target, dict(figures), units, cpu_ms, gateway=gateway)


def scenario(number: int, rows: list[Measurement], **extra: str) -> ScenarioResult:
    result = ScenarioResult(number, f"s{number}", "title", "request", [Metric("rps", "RPS")], "direct")
    result.runs.append(rows)
    result.extra.update(extra)
    return result


def checks_by_name(results: list[ScenarioResult]) -> dict[str, TargetCheck]:
    return {check.target: check for check in evaluate(results, peer="portkey", rate=200)}


# 1,000 requests each: CPU milliseconds below are per-request figures times 1,000.
NON_STREAM = scenario(
    1,
    [
        row("direct", 1000, {"upstream": 100}, "", rps=20_000),
        row(
            "relaygate",
            1000,
            {"relay": 400, "auth": 10, "quota": 90, "logger": 0, "postgres": 100, "redis": 0, "kafka": 0},
            "relaygate",
            rps=1600,
        ),
        row("portkey", 1000, {"portkey": 1000, "relay": 5}, "portkey", rps=1000),
    ],
)


def test_throughput_and_cpu_ratios_against_the_peer() -> None:
    checks = checks_by_name([NON_STREAM])

    rps = checks["Non-stream, 50 connections: RPS vs portkey"]
    assert rps.value is not None and abs(rps.value - 1.6) < 1e-9 and rps.met is True
    assert checks["Non-stream, 50 connections: RPS vs portkey (moonshot)"].met is False
    # Deployment = services 0.5 ms + PostgreSQL 0.1 ms = 0.6 ms against Portkey's 1.0 ms (its own tree only).
    cpu = checks["Non-stream: whole-deployment CPU per request vs portkey"]
    assert cpu.value is not None and abs(cpu.value - 0.6) < 1e-9 and cpu.met is True
    quota = checks["Non-stream: quota CPU per request"]
    assert quota.value is not None and abs(quota.value - 0.09) < 1e-9 and quota.met is True


def test_added_latency_is_a_difference_at_the_chosen_rate() -> None:
    fixed = scenario(
        3,
        [
            row("direct @ 200/s", 100, {}, "", p50_ms=0.2, p99_ms=1.0),
            row("relaygate @ 200/s", 100, {}, "relaygate", p50_ms=2.0, p99_ms=11.5, rps=200),
            row("direct stream @ 200/s", 100, {}, "", ttfb_p50_ms=0.3),
            row("relaygate stream @ 200/s", 100, {}, "relaygate", ttfb_p50_ms=2.4),
            # Another rate's rows must not be read.
            row("relaygate @ 20/s", 100, {}, "relaygate", p50_ms=99.0, p99_ms=99.0),
        ],
    )
    checks = checks_by_name([fixed])

    p50 = checks["Added latency at 200 RPS: p50"]
    assert p50.value is not None and abs(p50.value - 1.8) < 1e-9 and p50.met is True
    p99 = checks["Added latency at 200 RPS: p99"]
    assert p99.value is not None and abs(p99.value - 10.5) < 1e-9 and p99.met is False
    ttfb = checks["Added latency at 200 RPS: stream TTFB p50"]
    assert ttfb.value is not None and abs(ttfb.value - 2.1) < 1e-9 and ttfb.met is False


def test_growth_reads_the_rows_the_scenario_named() -> None:
    growth = scenario(
        7,
        [
            row("10 keys, 1 channel", 1000, {"relay": 1000, "postgres": 200}, "relaygate"),
            row("10,000 keys, 1 channel", 1000, {"relay": 1300, "auth": 300, "postgres": 200}, "relaygate"),
        ],
        few_keys_row="10 keys, 1 channel",
        many_keys_row="10,000 keys, 1 channel",
    )
    check = checks_by_name([growth])["Growth: deployment CPU per request, rotating many keys vs 10 keys"]

    assert check.value is not None and abs(check.value - 1.5) < 1e-9 and check.met is False


def test_growth_judges_the_warm_row_and_only_shows_the_first_use() -> None:
    growth = scenario(
        7,
        [
            row("10 keys, 1 channel", 1000, {"relay": 1000}, "relaygate"),
            row("10,000 keys, 1 channel, first use", 1000, {"relay": 1000, "auth": 2000}, "relaygate"),
            row("10,000 keys, 1 channel", 1000, {"relay": 1100}, "relaygate"),
        ],
        few_keys_row="10 keys, 1 channel",
        many_keys_row="10,000 keys, 1 channel",
        cold_keys_row="10,000 keys, 1 channel, first use",
    )
    check = checks_by_name([growth])["Growth: deployment CPU per request, rotating many keys vs 10 keys"]

    assert check.value is not None and abs(check.value - 1.1) < 1e-9 and check.met is True
    assert "(warm) 1.100 ms" in check.measured
    assert "first use of each key (cold, not judged) 3.000 ms, 3.00x" in check.measured


def test_a_target_without_its_rows_is_not_measured_never_met() -> None:
    checks = evaluate([], peer="portkey")

    assert len(checks) == 9
    assert all(check.met is None and check.verdict == "not measured" for check in checks)
