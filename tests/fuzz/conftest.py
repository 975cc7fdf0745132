"""One deployment for the fuzz suite, a funded user whose balance must never move, and admin tokens.

Hypothesis runs derandomized by default (the ``ci`` profile), so a failure reproduces on every run;
``HYPOTHESIS_PROFILE=deep RELAYGATE_FUZZ_SCALE=20`` explores further, with random seeds, by hand."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import httpx
import pytest
from hypothesis import HealthCheck, settings

from devinfra.backing import BackingServices
from tests.db_fixtures import DbUrls
from tests.e2e.stack import Deployment, deploy, fund_user, ok

_SLOW_INPUTS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=5),
    suppress_health_check=_SLOW_INPUTS,
    print_blob=True,
)
settings.register_profile(
    "deep",
    deadline=timedelta(seconds=5),
    suppress_health_check=_SLOW_INPUTS,
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

FUNDS = 5_000_000


def examples(count: int) -> int:
    """``count`` examples, times ``RELAYGATE_FUZZ_SCALE`` (1 in CI, where the suite stays under 60 s)."""
    return count * int(os.environ.get("RELAYGATE_FUZZ_SCALE", "1"))


@dataclass(frozen=True)
class Target:
    deployment: Deployment
    port: int
    user_id: str
    key: str
    read_token: str
    write_token: str
    # Ids that exist: generated paths must never name them (a write route could then act on them).
    known_ids: frozenset[str]
    # Kept alive across examples: the balance is read after every one.
    reader: httpx.Client

    def balance(self) -> tuple[int, int]:
        """The funded user's (balance, held) micro-units, read on the primary."""
        response = self.reader.get(f"/admin/v1/users/{self.user_id}/balance", params={"consistent": "true"})
        body = ok(response)
        return int(body["balance_micros"]), int(body["reserved_micros"])


@pytest.fixture(scope="module")
def deployment(
    backing: BackingServices, migrated_db: DbUrls, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployment]:
    # Short read deadlines: a generated request the relay waits on must not stall the suite.
    relay_env = {"RELAYGATE_HEADER_TIMEOUT_S": "3", "RELAYGATE_BODY_TIMEOUT_S": "3"}
    with deploy(backing, migrated_db, tmp_path_factory.mktemp("stack-logs"), relay_env=relay_env) as running:
        yield running


def _token(deployment: Deployment, scopes: list[str]) -> str:
    response = httpx.post(
        f"{deployment.relay_url}/admin/v1/tokens",
        headers={"authorization": f"Bearer {deployment.admin_key}"},
        json={"scopes": scopes},
        timeout=10,
    )
    return str(ok(response)["token"])


@pytest.fixture(scope="module")
def target(deployment: Deployment) -> Iterator[Target]:
    user_id, key = fund_user(deployment, FUNDS)
    with deployment.admin() as admin:
        users = ok(admin.get("/admin/v1/users"))["users"]
        keys = ok(admin.get("/admin/v1/keys"))["keys"]
        channels = ok(admin.get("/admin/v1/channels"))["channels"]
    known = {u["user_id"] for u in users} | {k["key_id"] for k in keys} | {c["channel_id"] for c in channels}
    read_token = _token(deployment, ["admin:read"])
    reader = httpx.Client(
        base_url=deployment.relay_url, headers={"authorization": f"Bearer {read_token}"}, timeout=10
    )
    with reader:
        yield Target(
            deployment=deployment,
            port=int(deployment.relay_url.rsplit(":", 1)[1]),
            user_id=user_id,
            key=key,
            read_token=read_token,
            write_token=_token(deployment, ["admin:read", "admin:write"]),
            known_ids=frozenset(known),
            reader=reader,
        )
