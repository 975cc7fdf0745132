"""``python -m bench``: start the fake upstream, the backing services and the four relaygate processes on
127.0.0.1, run the scenarios, and write ``<out>/<stamp>.json`` and ``<out>/<stamp>.md``.

See ``bench/README.md`` for what each scenario measures and how to read the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.conversions import run as conversions
from bench.env import BenchEnv, ToolMissing, ensure_tool
from bench.peer import PEER_NAMES, Peer, parse_peers, start_peer
from bench.report import ScenarioResult, machine_description, write_outputs
from bench.scenarios import OPT_IN, SCENARIOS, Bench, Settings, Target
from bench.targets import evaluate
from devinfra.backing import BackingServices

DEFAULT_OUT = Path(__file__).parent / "results"

# --quick: about a second per measurement and small counts, to prove every scenario still runs.
QUICK = {
    "duration_s": 1.0,
    "runs": 1,
    "streams": 200,
    "stream_open_rate": 400.0,
    "ingest_rate": 500.0,
    "ingest_burst": 2000,
    "growth_keys": 200,
    "growth_channels": 5,
    "auth_keys": 100,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--scenarios",
        default=",".join(str(n) for n in SCENARIOS if n not in OPT_IN),
        help=f"comma-separated numbers (default: all but {sorted(OPT_IN)}, which run only when named)",
    )
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per measurement (default 15)")
    parser.add_argument("--runs", type=int, default=3, help="runs per scenario; medians are reported (3)")
    parser.add_argument("--quick", action="store_true", help="1 s per measurement, small counts (smoke test)")
    parser.add_argument(
        "--peer",
        default="",
        help=f"peer gateways for scenarios 1-3 and 9, comma-separated ({','.join(PEER_NAMES)})",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (bench/results)")
    parser.add_argument("--rates", default="20,200", help="scenario 3 request rates per second (20,200)")
    parser.add_argument("--streams", type=int, default=2000, help="scenario 4 concurrent streams (2000)")
    parser.add_argument("--growth-keys", type=int, default=10_000, help="scenario 7 key count (10000)")
    parser.add_argument("--no-install", action="store_true", help="fail instead of apt-installing wrk")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (service logs)")
    parser.add_argument(
        "--conversions",
        action="store_true",
        help="only the CPU per streamed chunk of each provider conversion (no services started)",
    )
    return parser


def settings_from(args: argparse.Namespace, wrk: str) -> Settings:
    values: dict[str, Any] = {
        "duration_s": args.duration,
        "runs": args.runs,
        "rates": tuple(float(r) for r in args.rates.split(",") if r.strip()),
        "streams": args.streams,
        "growth_keys": args.growth_keys,
        "wrk": wrk,
    }
    if args.quick:
        values.update(QUICK)
        values["rates"] = (50.0,)
    return Settings(**values)


def parse_scenarios(text: str) -> list[int]:
    numbers = sorted({int(part) for part in text.split(",") if part.strip()})
    unknown = [n for n in numbers if n not in SCENARIOS]
    if unknown or not numbers:
        raise SystemExit(f"unknown scenarios {unknown}; choose from {sorted(SCENARIOS)}")
    return numbers


def target_rate(rates: Sequence[float]) -> float:
    """The scenario 3 rate the latency targets read: 200/s when measured, else the highest."""
    return 200.0 if 200.0 in rates else max(rates, default=200.0)


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: Sequence[str] | None = None, *, backing: BackingServices | None = None) -> int:
    """Run the benchmark; ``backing`` lends already running backing services (the test suite's)."""
    args = build_parser().parse_args(argv)
    if args.conversions:
        print(conversions())
        return 0
    numbers = parse_scenarios(args.scenarios)
    peer_names = parse_peers(args.peer)
    try:
        wrk = ensure_tool("wrk", install=not args.no_install)
    except ToolMissing as exc:
        print(f"cannot run the benchmark: {exc}", file=sys.stderr)
        return 2
    settings = settings_from(args, wrk)
    now = datetime.datetime.now(datetime.UTC)
    command = shlex.join(["python", "-m", "bench", *(argv if argv is not None else sys.argv[1:])])
    meta: dict[str, Any] = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "stamp": now.strftime("%Y%m%dT%H%M%SZ"),
        "command": command,
        "machine": machine_description(),
        "revision": git_revision(),
        "runs": settings.runs,
        "duration_s": settings.duration_s,
        "scenarios": numbers,
        "settings": dataclasses.asdict(settings),
    }
    work = Path(tempfile.mkdtemp(prefix="relaygate-bench-"))
    started = time.monotonic()
    results: list[ScenarioResult] = []
    failed: list[int] = []
    print(f"starting the deployment (work directory {work}) ...", flush=True)
    env = BenchEnv.start(work, backing=backing)
    peers: list[Peer] = []
    try:
        print(f"ready in {time.monotonic() - started:.1f}s: relay {env.relay_url}, upstream {env.direct_url}")
        bench = Bench(env, settings)
        for name in peer_names:
            peer = start_peer(name, work, upstream_base_url=f"{env.direct_url}/v1")
            peers.append(peer)
            env.tracked.append(peer.tracked())
            keys_file = env.keys_file(list(peer.keys), f"keys-{name}.txt")
            bench.peers.append(Target(name, peer.origin, name, name, peer.keys, keys_file, peer.headers))
            print(f"peer {name} {peer.version} at {peer.origin}", flush=True)
        if peers:
            meta["peer"] = ", ".join(f"{p.name} {p.version}" for p in peers)
        bench.warm_up()
        for number in numbers:
            began = time.monotonic()
            print(f"scenario {number}: {SCENARIOS[number].__name__} ...", flush=True)
            try:
                results.append(SCENARIOS[number](bench))
            except Exception:
                failed.append(number)
                traceback.print_exc()
                print(f"scenario {number} FAILED; service logs are in {work / 'logs'}", file=sys.stderr)
            print(f"scenario {number} took {time.monotonic() - began:.1f}s", flush=True)
            if crashed := env.stack.crashed():
                print(f"services exited during the run: {crashed}", file=sys.stderr)
                failed.append(number)
                break
    finally:
        for peer in peers:
            peer.stop()
        env.stop()
    meta["total_s"] = round(time.monotonic() - started, 1)
    meta["failed_scenarios"] = failed
    rate = target_rate(settings.rates)
    # The peer targets are set against Portkey, whichever other peers ran.
    targets = evaluate(results, peer="portkey", rate=rate)
    json_path, md_path = write_outputs(results, meta, args.out, targets)
    print()
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path} in {meta['total_s']:.0f}s")
    if failed or args.keep:
        print(f"work directory kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
