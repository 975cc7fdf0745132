"""Results: the data model every scenario fills in, medians over runs, and the JSON + Markdown output.

A scenario measures several *targets* side by side in one run (``direct`` to the fake upstream,
``relaygate``, optionally a peer gateway, or variants such as "10,000 keys"). Each measurement has its
figures (RPS, latencies, ...), the number of work units done (requests, events, pairs), the CPU
milliseconds every tracked process spent during it, and memory after it. With ``--runs N`` each figure
is the median of the N runs, taken figure by figure.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEPLOYMENT_BACKING",
    "RELAYGATE_SERVICES",
    "Measurement",
    "Metric",
    "ScenarioResult",
    "TargetCheck",
    "percentile",
    "render_markdown",
    "write_outputs",
]

RELAYGATE_SERVICES = ("relay", "auth", "quota", "logger")
# What a relaygate deployment needs besides its four services; a peer gateway here is one process tree.
DEPLOYMENT_BACKING = ("kafka", "postgres", "pg-replica", "redis")
PEER_PROCESSES = ("litellm", "portkey")
# CPU columns, in order; "relaygate" is the sum of the four services.
CPU_COLUMNS = (
    "relaygate", *RELAYGATE_SERVICES, *DEPLOYMENT_BACKING, "upstream", "loadgen", "harness", *PEER_PROCESSES,
)  # fmt: skip
MEMORY_COLUMNS = (*RELAYGATE_SERVICES, "kafka", "upstream", *PEER_PROCESSES)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank; 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


@dataclass(frozen=True)
class Metric:
    """One figure of a scenario: ``key`` in :attr:`Measurement.figures`, shown as ``label``.

    ``compare`` says how the figure relates to the baseline row: ``"ratio"`` (x), ``"delta"`` (+ms), or
    ``""`` (not compared).
    """

    key: str
    label: str
    digits: int = 1
    compare: str = "ratio"


@dataclass
class Measurement:
    target: str
    figures: dict[str, float]
    units: int
    cpu_ms: dict[str, float] = field(default_factory=dict)
    memory_mb: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0
    compare_to: str = ""  # the target this row is compared with, when not the scenario's baseline
    gateway: str = "relaygate"  # whose CPU the "gateway CPU" column shows ("" for direct rows)

    def cpu_per_unit(self) -> dict[str, float]:
        """CPU milliseconds per unit of work for each process, plus the relaygate total."""
        if self.units <= 0:
            return {}
        per = {name: ms / self.units for name, ms in self.cpu_ms.items()}
        per["relaygate"] = sum(per.get(name, 0.0) for name in RELAYGATE_SERVICES)
        return per

    def gateway_cpu_per_unit(self) -> float | None:
        return self.cpu_per_unit().get(self.gateway) if self.gateway else None

    def deployment_cpu_per_unit(self) -> float | None:
        """The gateway's CPU per unit plus, for relaygate, PostgreSQL, Redis and the broker it needs."""
        gateway = self.gateway_cpu_per_unit()
        if gateway is None or self.gateway != "relaygate":
            return gateway
        per = self.cpu_per_unit()
        return gateway + sum(per.get(name, 0.0) for name in DEPLOYMENT_BACKING)


@dataclass
class ScenarioResult:
    number: int
    key: str
    title: str
    unit: str
    metrics: list[Metric]
    baseline: str  # the target the others are compared with
    runs: list[list[Measurement]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def targets(self) -> list[str]:
        seen: list[str] = []
        for run in self.runs:
            for m in run:
                if m.target not in seen:
                    seen.append(m.target)
        return seen

    def median(self, target: str) -> Measurement | None:
        """The figure-by-figure median of ``target`` over all runs."""
        found = [m for run in self.runs for m in run if m.target == target]
        if not found:
            return None
        if len(found) == 1:
            return found[0]

        def med(dicts: list[dict[str, float]]) -> dict[str, float]:
            keys = {k for d in dicts for k in d}
            return {k: statistics.median([d[k] for d in dicts if k in d]) for k in keys}

        return Measurement(
            target=target,
            figures=med([m.figures for m in found]),
            units=int(statistics.median([m.units for m in found])),
            cpu_ms=med([m.cpu_ms for m in found]),
            memory_mb=med([m.memory_mb for m in found]),
            wall_s=statistics.median([m.wall_s for m in found]),
            compare_to=found[0].compare_to,
            gateway=found[0].gateway,
        )

    def medians(self) -> list[Measurement]:
        return [m for t in self.targets() if (m := self.median(t)) is not None]


@dataclass(frozen=True)
class TargetCheck:
    """One target of the benchmark issue, judged on this run's medians (see ``bench/targets.py``)."""

    target: str  # the wording
    limit: str  # what counts as met, e.g. ">= 1.5x"
    value: float | None  # the ratio or difference judged (None: not measured in this run)
    shown: str  # ``value`` as the table prints it
    measured: str  # the figures behind it
    met: bool | None  # None: not measured

    @property
    def verdict(self) -> str:
        return "not measured" if self.met is None else "met" if self.met else "not met"


# --- output --------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int) -> str:
    if value is None:
        return "-"
    if digits == 0 or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def _compared(metric: Metric, value: float | None, base: float | None) -> str:
    if value is None or base is None or not metric.compare:
        return ""
    if metric.compare == "delta":
        return f" ({value - base:+.{max(metric.digits, 1)}f})"
    if base == 0:
        return ""
    return f" ({value / base:.2f}x)"


def _scenario_markdown(result: ScenarioResult) -> list[str]:
    lines = [f"### {result.number}. {result.title}", ""]
    rows = result.medians()
    by_target = {m.target: m for m in rows}
    header = [
        "target",
        *(m.label for m in result.metrics),
        f"gateway CPU ms/{result.unit}",
        f"deployment CPU ms/{result.unit}",
    ]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows:
        cells = [row.target]
        base = by_target.get(row.compare_to or result.baseline)
        for metric in result.metrics:
            value = row.figures.get(metric.key)
            reference = base.figures.get(metric.key) if base is not None and row is not base else None
            cells.append(_fmt(value, metric.digits) + _compared(metric, value, reference))
        cells.append(_fmt(row.gateway_cpu_per_unit(), 3))
        cells.append(_fmt(row.deployment_cpu_per_unit(), 3))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"CPU ms per {result.unit} by process, and memory (MiB) at the end of each measurement:")
    lines.append("")
    cpu_cols = [c for c in CPU_COLUMNS if any(c in r.cpu_per_unit() for r in rows)]
    mem_cols = [c for c in MEMORY_COLUMNS if any(c in r.memory_mb for r in rows)]
    header = ["target", *cpu_cols, *(f"{c} MiB" for c in mem_cols)]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows:
        per = row.cpu_per_unit()
        cells = [row.target, *(_fmt(per.get(c), 3) for c in cpu_cols)]
        cells += [_fmt(row.memory_mb.get(c), 0) for c in mem_cols]
        lines.append("| " + " | ".join(cells) + " |")
    if result.notes:
        lines.append("")
        lines.extend(f"- {note}" for note in result.notes)
    lines.append("")
    return lines


def targets_markdown(checks: Sequence[TargetCheck]) -> list[str]:
    lines = [
        "### Targets",
        "",
        "| target | limit | value | measured | verdict |",
        "|---|---|---|---|---|",
    ]
    for check in checks:
        lines.append(
            f"| {check.target} | {check.limit} | {check.shown} | {check.measured} | {check.verdict} |"
        )
    lines.append("")
    lines.append(
        "- Deployment CPU is relaygate's four services plus PostgreSQL (primary and replica), Redis and the "
        "broker; a peer's is its own process tree (it has no database or broker here)."
    )
    lines.append("")
    return lines


def render_markdown(
    results: Sequence[ScenarioResult], meta: dict[str, Any], targets: Sequence[TargetCheck] = ()
) -> str:
    lines = [
        f"## relaygate benchmark, {meta['date']}",
        "",
        f"`{meta['command']}` on {meta['machine']}; {meta['runs']} run(s) of {meta['duration_s']:g} s per "
        "measurement, medians shown. Figures in parentheses compare a row with its baseline measured in the "
        "same run (direct to the fake upstream, unless the scenario says otherwise): x is a ratio, +/- a "
        "difference.",
        "",
    ]
    if targets:
        lines.extend(targets_markdown(targets))
    for result in results:
        lines.extend(_scenario_markdown(result))
    return "\n".join(lines)


def machine_description() -> str:
    cpus = 0
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("processor"):
                cpus += 1
            elif line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{cpus} x {model}, Linux {platform.release()}, Python {platform.python_version()}"


def write_outputs(
    results: Sequence[ScenarioResult],
    meta: dict[str, Any],
    out_dir: Path,
    targets: Sequence[TargetCheck] = (),
) -> tuple[Path, Path]:
    """Write ``<stamp>.json`` (every run of every measurement) and ``<stamp>.md``; return both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = meta["stamp"]
    document = {
        "meta": meta,
        "targets": [{**asdict(check), "verdict": check.verdict} for check in targets],
        "scenarios": [
            {
                "number": r.number,
                "key": r.key,
                "title": r.title,
                "unit": r.unit,
                "baseline": r.baseline,
                "metrics": [asdict(m) for m in r.metrics],
                "median": [{**asdict(m), "cpu_ms_per_unit": m.cpu_per_unit()} for m in r.medians()],
                "runs": [[asdict(m) for m in run] for run in r.runs],
                "notes": r.notes,
                "extra": r.extra,
            }
            for r in results
        ],
    }
    json_path = out_dir / f"{stamp}.json"
    md_path = out_dir / f"{stamp}.md"
    json_path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n")
    md_path.write_text(render_markdown(results, meta, targets) + "\n")
    return json_path, md_path
