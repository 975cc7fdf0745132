"""The credit-control protocol under a deterministic simulation (see ``tests/credit_sim/world.py``).

A failure names the seed and step; ``python -m tests.credit_sim --seed N --steps M`` replays it exactly.
"""

from __future__ import annotations

import dataclasses

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
    # Keys without budgets of their own rode their users' shared leases.
    assert summary["on_shared"] > summary["requests"] // 10, summary
    assert summary["charges"] > 1_000, summary


def test_a_calm_world_charges_every_request_and_writes_nothing_off() -> None:
    simulation = Simulation(11, faults=Faults.none())
    simulation.run(STEPS)
    summary = simulation.summary()
    assert summary.get("unavailable", 0) == 0 and summary.get("lost", 0) == 0, summary
    # Every request that met a recall got the leases' credit back, or the exact path's refusal.
    assert summary.get("recalled", 0) == 0, summary
    assert summary["written_off"] == 0, summary
    assert summary["charges"] == summary["finished"], summary


def test_the_same_seed_replays_the_same_run() -> None:
    first, second = Simulation(5), Simulation(5)
    first.run(5_000)
    second.run(5_000)
    assert first.summary() == second.summary()
    assert first.trace == second.trace


def worth_150(seed: int, faults: Faults) -> Simulation:
    """A user worth exactly 150 requests on two relays, and 200 requests at once spread unevenly over
    them, run to the end."""
    simulation = Simulation(seed, relays=2, users=1, keys_per_user=1, faults=faults, background_traffic=False)
    simulation.caps.clear()
    simulation.user_caps.clear()
    account = simulation.db.accounts["u0"]
    simulation.db.top_up("u0", 150 * 10 * UNIT - account.balance)
    simulation.funded["u0"] = 150 * 10 * UNIT
    at = 0
    for index in range(200):
        at += 3
        simulation.submit(at, 0 if index % 4 else 1, "k0.0", 10 * UNIT, 10 * UNIT)
    simulation.run_until(at + 30_000)
    simulation.settle_down()
    return simulation


def test_the_last_units_of_a_balance_go_to_whichever_relay_asks() -> None:
    # Exactly 150 are served, however the leases were split.
    simulation = worth_150(3, Faults.none())
    served = [r for r in simulation.requests.values() if r.state == "finished"]
    refused = [r for r in simulation.requests.values() if r.state == "refused"]
    assert (len(served), len(refused)) == (150, 50)
    assert simulation.db.accounts["u0"].balance == 0
    assert any("-L" in request.hold_id for request in served), "no request was served on a lease"


@pytest.mark.parametrize("seed", [1, 3, 8])
def test_slow_syncs_leave_no_request_refused_for_a_recall(seed: int) -> None:
    # One message in ten is stuck for up to 3 s: recalls reach their relays late. A request that met a
    # recall still ends served or refused by the exact path; what quota could not answer in time
    # (a reserve past its deadline, held in quota until it expires) is the only other outcome.
    simulation = worth_150(seed, dataclasses.replace(Faults.none(), rpc_slow=0.1))
    summary = simulation.summary()
    assert summary.get("recalled", 0) == 0, summary
    assert summary["finished"] + summary.get("unavailable", 0) >= 150 >= summary["finished"], summary


def test_leased_keys_ride_out_a_quota_outage() -> None:
    # Steady traffic on a funded key; every quota process stops for 10 s. Requests on a live lease are
    # all served; nothing fails until the lease would run out.
    terms = CreditTerms(horizon_ms=60_000, reservation_ttl_ms=120_000)
    simulation = Simulation(
        7, relays=2, users=1, keys_per_user=1, faults=Faults.none(), background_traffic=False, terms=terms
    )
    simulation.caps.clear()
    simulation.user_caps.clear()
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


def test_rotating_keys_ride_their_users_shared_lease() -> None:
    # 200 keys of one user, each seen once every 200 requests (far apart for any one key): after the
    # user's first requests, every key is admitted on the relay's one lease of the user.
    simulation = Simulation(
        13, relays=1, users=1, keys_per_user=200, faults=Faults.none(), background_traffic=False
    )
    simulation.caps.clear()
    simulation.user_caps.clear()
    for index in range(2_000):
        simulation.submit(1_000 + index * 10, 0, f"k0.{index % 200}", 5 * UNIT, 2 * UNIT)
    simulation.run_until(30_000)
    simulation.settle_down()
    summary = simulation.summary()
    assert summary["finished"] == 2_000, summary
    assert summary["on_shared"] >= 1_990 and summary["leases"] == summary["shared_leases"] == 1, summary
