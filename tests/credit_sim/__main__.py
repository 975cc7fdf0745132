"""Run or reproduce a simulation: ``python -m tests.credit_sim --seed 7 --steps 20000``.

A failure prints the seed and step that reproduce it, with the steps that led there.
"""

from __future__ import annotations

import argparse
import sys
import time

from tests.credit_sim.world import Faults, Simulation, SimulationFailure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.credit_sim", description=__doc__)
    parser.add_argument("--seed", type=int, default=1, help="first seed")
    parser.add_argument("--seeds", type=int, default=1, help="how many consecutive seeds to run")
    parser.add_argument("--steps", type=int, default=20_000, help="steps of traffic and faults per seed")
    parser.add_argument("--calm", action="store_true", help="no faults")
    parser.add_argument("--trace", type=int, default=40, help="steps shown before a failure")
    args = parser.parse_args(argv)
    failed = 0
    for seed in range(args.seed, args.seed + args.seeds):
        started = time.perf_counter()
        simulation = Simulation(seed, faults=Faults.none() if args.calm else None, trace_size=args.trace)
        try:
            simulation.run(args.steps)
        except SimulationFailure as failure:
            failed += 1
            print(failure, file=sys.stderr)
            continue
        took = time.perf_counter() - started
        print(f"seed {seed}: ok in {took:.1f}s {simulation.summary()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
