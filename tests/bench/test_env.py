"""The bench's stack settings let one relay hold scenario 4's streams over the bench's few keys."""

from __future__ import annotations

import pytest

from bench.env import BASE_USERS, STACK_SETTINGS
from bench.scenarios import Settings
from services.relay.settings import RelaySettings


def test_the_relay_settings_admit_every_stream_of_scenario_4(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in STACK_SETTINGS.items():
        monkeypatch.setenv(name, value)
    relay = RelaySettings()
    streams = Settings().streams

    # The streams are spread evenly over the base keys; each key's share must fit under its cap, or the
    # relay answers the rest with 429 and scenario 4 measures the cap instead of the relay.
    assert relay.max_streams_per_key * BASE_USERS >= streams
    assert relay.upstream_max_connections >= streams
