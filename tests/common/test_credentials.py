"""Which channel values are credentials, how they are masked, and how a mask sent back is recognised."""

from __future__ import annotations

import pytest

from services.common.credentials import is_secret_header, mask, mask_headers, unmask


@pytest.mark.parametrize(
    "name",
    ["Authorization", "api-key", "x-api-key", "X-Goog-Api-Key", "x-auth-token", "Cookie", "x-session-id"],
)
def test_credential_header_names(name: str) -> None:
    assert is_secret_header(name, "value")


def test_auth_schemes_are_secret_whatever_the_header_is_called() -> None:
    assert is_secret_header("x-upstream", "Bearer abc")
    assert is_secret_header("x-upstream", "basic dXNlcjpwYXNz")
    assert not is_secret_header("anthropic-version", "2023-06-01")
    assert not is_secret_header("openai-organization", "org-abc")


def test_masks_show_at_most_seven_characters_of_long_values_and_none_of_short_ones() -> None:
    assert mask("") == ""
    assert mask("short-secret") == "…"
    assert mask("sk-live-0123456789abcdefghijklmnop") == "sk-…mnop"
    assert mask_headers({"x-api-key": "short-secret", "accept": "application/json"}) == {
        "x-api-key": "…",
        "accept": "application/json",
    }


def test_a_mask_sent_back_keeps_the_stored_value_only_when_it_is_that_values_mask() -> None:
    stored = "sk-live-0123456789abcdefghijklmnop"
    assert unmask(mask(stored), stored) == stored
    assert unmask("sk-new-plaintext-key", stored) == "sk-new-plaintext-key"
    assert unmask("", stored) == ""
    assert unmask("sk-…zzzz", stored) is None
    assert unmask("…", "") is None
