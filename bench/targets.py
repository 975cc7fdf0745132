"""The credit-control issue's targets, judged on one run's medians against direct and a peer gateway.

Each target names the scenario rows it reads; a target whose rows this run did not measure (a scenario
not selected, no ``--peer portkey``) is reported as "not measured", never as met.
"""

from __future__ import annotations

from collections.abc import Sequence

from bench.report import Measurement, ScenarioResult, TargetCheck

__all__ = ["evaluate"]

# Limits from the issue.
RPS_RATIO = 1.5
RPS_RATIO_MOONSHOT = 2.0
DEPLOYMENT_CPU_RATIO = 0.6
QUOTA_CPU_MS = 0.1
ADDED_P50_MS = 2.0
ADDED_P99_MS = 10.0
ADDED_TTFB_P50_MS = 2.0
PACED_CPU_RATIO = 1.0
GROWTH_CPU_RATIO = 1.3


class _Rows:
    def __init__(self, results: Sequence[ScenarioResult]) -> None:
        self._by_number = {r.number: r for r in results}

    def get(self, number: int, target: str) -> Measurement | None:
        result = self._by_number.get(number)
        return result.median(target) if result is not None else None

    def extra(self, number: int, key: str) -> str:
        result = self._by_number.get(number)
        return str(result.extra.get(key, "")) if result is not None else ""


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} ms"


def _not_measured(target: str, limit: str, why: str) -> TargetCheck:
    return TargetCheck(target, limit, None, "-", why, None)


def _ratio_check(
    target: str, limit: float, value: float | None, measured: str, *, at_least: bool, why: str
) -> TargetCheck:
    shown_limit = f"{'>=' if at_least else '<='} {limit:g}x"
    if value is None:
        return _not_measured(target, shown_limit, why)
    met = value >= limit if at_least else value <= limit
    return TargetCheck(target, shown_limit, value, f"{value:.2f}x", measured, met)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def _fig(row: Measurement | None, key: str) -> float | None:
    return None if row is None else row.figures.get(key)


def evaluate(
    results: Sequence[ScenarioResult], *, peer: str = "portkey", rate: float = 200
) -> list[TargetCheck]:
    """Every target, in the issue's order; ``rate`` is scenario 3's rate the latency targets read."""
    rows = _Rows(results)
    checks: list[TargetCheck] = []
    no_peer = f"needs scenario {{}} with --peer {peer}"

    # Non-stream throughput and cost, scenario 1.
    direct, ours, theirs = (rows.get(1, name) for name in ("direct", "relaygate", peer))
    rps = _ratio(_fig(ours, "rps"), _fig(theirs, "rps"))
    of_direct = _ratio(_fig(ours, "rps"), _fig(direct, "rps")) or 0
    rps_text = (
        f"relaygate {_fig(ours, 'rps') or 0:,.0f} RPS, {peer} {_fig(theirs, 'rps') or 0:,.0f}, direct "
        f"{_fig(direct, 'rps') or 0:,.0f} (relaygate {of_direct:.3f}x direct)"
    )
    for limit, label in ((RPS_RATIO, ""), (RPS_RATIO_MOONSHOT, " (moonshot)")):
        checks.append(
            _ratio_check(
                f"Non-stream, 50 connections: RPS vs {peer}{label}",
                limit,
                rps,
                rps_text,
                at_least=True,
                why=no_peer.format(1),
            )
        )
    our_cpu = ours.deployment_cpu_per_unit() if ours is not None else None
    their_cpu = theirs.gateway_cpu_per_unit() if theirs is not None else None
    services = ours.gateway_cpu_per_unit() if ours is not None else None
    checks.append(
        _ratio_check(
            f"Non-stream: whole-deployment CPU per request vs {peer}",
            DEPLOYMENT_CPU_RATIO,
            _ratio(our_cpu, their_cpu),
            f"relaygate {_ms(our_cpu)} (services {_ms(services)}), {peer} {_ms(their_cpu)}",
            at_least=False,
            why=no_peer.format(1),
        )
    )
    quota = ours.cpu_per_unit().get("quota") if ours is not None else None
    limit_text = f"<= {QUOTA_CPU_MS:g} ms"
    if quota is None:
        checks.append(_not_measured("Non-stream: quota CPU per request", limit_text, "needs scenario 1"))
    else:
        checks.append(
            TargetCheck(
                "Non-stream: quota CPU per request",
                limit_text,
                quota,
                _ms(quota),
                f"quota {_ms(quota)} of relaygate's {_ms(services)}",
                quota <= QUOTA_CPU_MS,
            )
        )

    # Added latency at a fixed rate, scenario 3.
    def at(name: str, stream: bool) -> Measurement | None:
        return rows.get(3, f"{name}{' stream' if stream else ''} @ {rate:g}/s")

    latency_targets: list[tuple[str, str, bool, float]] = [
        (f"Added latency at {rate:g} RPS: p50", "p50_ms", False, ADDED_P50_MS),
        (f"Added latency at {rate:g} RPS: p99", "p99_ms", False, ADDED_P99_MS),
        (f"Added latency at {rate:g} RPS: stream TTFB p50", "ttfb_p50_ms", True, ADDED_TTFB_P50_MS),
    ]
    for label, key, stream, limit in latency_targets:
        base, mine, peer_row = at("direct", stream), at("relaygate", stream), at(peer, stream)
        limit_text = f"<= direct + {limit:g} ms"
        value, direct_value = _fig(mine, key), _fig(base, key)
        if value is None or direct_value is None:
            checks.append(_not_measured(label, limit_text, f"needs scenario 3 at {rate:g}/s"))
            continue
        added = value - direct_value
        measured = f"relaygate {value:.2f} ms, direct {direct_value:.2f} ms"
        if (peer_value := _fig(peer_row, key)) is not None:
            measured += f", {peer} {peer_value:.2f} ms (+{peer_value - direct_value:.2f})"
        achieved = _fig(mine, "rps")
        if achieved is not None and achieved < 0.95 * rate:
            measured += f"; relaygate achieved {achieved:.0f} RPS"
        checks.append(TargetCheck(label, limit_text, added, f"+{added:.2f} ms", measured, added <= limit))

    # Paced streams, scenario 9.
    ours_paced, theirs_paced = rows.get(9, "relaygate"), rows.get(9, peer)
    paced_ours = ours_paced.deployment_cpu_per_unit() if ours_paced is not None else None
    paced_theirs = theirs_paced.gateway_cpu_per_unit() if theirs_paced is not None else None
    paced_services = ours_paced.gateway_cpu_per_unit() if ours_paced is not None else None
    checks.append(
        _ratio_check(
            f"Paced streams (100 chunks, 2 ms apart): deployment CPU per stream vs {peer}",
            PACED_CPU_RATIO,
            _ratio(paced_ours, paced_theirs),
            f"relaygate {_ms(paced_ours)} (services {_ms(paced_services)}), {peer} {_ms(paced_theirs)}",
            at_least=False,
            why=no_peer.format(9),
        )
    )

    # Growth, scenario 7: judged on the warm many-keys row (every key verified within the relay's auth
    # cache TTL, a deployment's steady state); the first use of each key is shown, not judged.
    few_name, many_name = rows.extra(7, "few_keys_row"), rows.extra(7, "many_keys_row")
    few, many = rows.get(7, few_name), rows.get(7, many_name)
    cold = rows.get(7, rows.extra(7, "cold_keys_row"))
    few_cpu = few.deployment_cpu_per_unit() if few is not None else None
    many_cpu = many.deployment_cpu_per_unit() if many is not None else None
    cold_cpu = cold.deployment_cpu_per_unit() if cold is not None else None
    measured = f"{many_name or 'many keys'} (warm) {_ms(many_cpu)}, {few_name or 'few keys'} {_ms(few_cpu)}"
    if (cold_ratio := _ratio(cold_cpu, few_cpu)) is not None:
        measured += f"; first use of each key (cold, not judged) {_ms(cold_cpu)}, {cold_ratio:.2f}x"
    checks.append(
        _ratio_check(
            "Growth: deployment CPU per request, rotating many keys vs 10 keys",
            GROWTH_CPU_RATIO,
            _ratio(many_cpu, few_cpu),
            measured,
            at_least=False,
            why="needs scenario 7",
        )
    )
    return checks
