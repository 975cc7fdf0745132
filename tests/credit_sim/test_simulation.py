"""The credit-control protocol under a deterministic simulation (see ``tests/credit_sim/world.py``).

A failure names the seed and step; ``python -m tests.credit_sim --seed N --steps M`` replays it exactly.
"""

from __future__ import annotations

import pytest

from services.common.credit import CreditTerms
from tests.credit_sim.world import UNIT, Faults, Simulation

SEEDS = range(1, 9)
STEPS = 25_000


@pytest.mark.parametrize("seed", SEEDS)
def test_invariants_hold_under_faults(seed: int) -> None:
    # 8 seeds x 25,000 steps of traffic and faults (plus the steps to drain): well over 100,000 steps.
    simulation = Simulation(seed)
    simulation.run(STEPS)
    summary = simulation.summary()
    assert summary["leased"] > summary["requests"] // 4, summary
    assert summary["charges"] > 1_000, summary


def test_a_calm_world_charges_every_request_and_writes_nothing_off() -> None:
    simulation = Simulation(11, faults=Faults.none())
    simulation.run(STEPS)
    summary = simulation.summary()
    assert summary.get("unavailable", 0) == 0 and summary.get("lost", 0) == 0, summary
    assert summary["written_off"] == 0, summary
    assert summary["charges"] == summary["finished"], summary


def test_the_same_seed_replays_the_same_run() -> None:
    first, second = Simulation(5), Simulation(5)
    first.run(5_000)
    second.run(5_000)
    assert first.summary() == second.summary()
    assert first.trace == second.trace


def test_the_last_units_of_a_balance_go_to_whichever_relay_asks() -> None:
    # A user worth exactly 150 requests, leased on two relays, then 200 more requests spread unevenly
    # over them: exactly 150 are served, however the leases were split.
    simulation = Simulation(
        3, relays=2, users=1, keys_per_user=1, faults=Faults.none(), background_traffic=False
    )
    simulation.caps.clear()
    account = simulation.db.accounts["u0"]
    simulation.db.top_up("u0", 150 * 10 * UNIT - account.balance)
    simulation.funded["u0"] = 150 * 10 * UNIT
    at = 0
    for index in range(200):
        at += 3
        simulation.submit(at, 0 if index % 4 else 1, "k0.0", 10 * UNIT, 10 * UNIT)
    simulation.run_until(at + 30_000)
    simulation.settle_down()
    served = [r for r in simulation.requests.values() if r.state == "finished"]
    refused = [r for r in simulation.requests.values() if r.state == "refused"]
    assert (len(served), len(refused)) == (150, 50)
    assert simulation.db.accounts["u0"].balance == 0
    assert any("-L" in request.hold_id for request in served), "no request was served on a lease"


def test_leased_keys_ride_out_a_quota_outage() -> None:
    # Steady traffic on a funded key; every quota process stops for 10 s. Requests on a live lease are
    # all served; nothing fails until the lease would run out.
    terms = CreditTerms(horizon_ms=60_000, reservation_ttl_ms=120_000)
    simulation = Simulation(
        7, relays=2, users=1, keys_per_user=1, faults=Faults.none(), background_traffic=False, terms=terms
    )
    simulation.caps.clear()
    for index in range(4_000):
        simulation.submit(index * 10, index % 2, "k0.0", 5 * UNIT, 2 * UNIT)
    simulation.run_until(10_000)
    simulation.crash_all_quotas(10_000)
    simulation.run_until(45_000)
    simulation.settle_down()
    during = [r for r in simulation.requests.values() if 10_000 <= r.arrived_at < 20_000]
    assert len(during) == 1_000
    failed = {r.request_id: r.state for r in simulation.requests.values() if r.state != "finished"}
    assert not failed
    assert all("-L" in r.hold_id for r in during), "requests during the outage went through quota"
