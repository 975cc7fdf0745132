"""The edge's bounds, one function at a time: nesting depth, array lengths, integer ranges, credential
length, NUL characters and the per-key stream slots."""

from __future__ import annotations

import pytest

from services.common.errors import AuthenticationError, ConcurrencyLimited, InvalidRequest
from services.relay.meter.slots import StreamSlots
from services.relay.pipeline.checks import (
    MAX_API_KEY_CHARS,
    bounded_credential,
    optional_array,
    optional_positive_int,
    parse_json,
    refuse_nul,
    require_model,
    require_text_or_array,
)


def nested(depth: int) -> bytes:
    """A body whose ``field`` makes the whole document ``depth`` levels deep."""
    return b'{"field": ' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


def test_a_body_at_the_depth_limit_parses() -> None:
    assert parse_json(nested(64), max_depth=64)["field"]


def test_one_level_more_is_refused_naming_the_field() -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_json(nested(65), max_depth=64)
    assert refused.value.param == "field"


def test_objects_count_like_arrays() -> None:
    deep = b'{"tools": ' + b'{"a": ' * 70 + b"1" + b"}" * 70 + b"}"
    with pytest.raises(InvalidRequest) as refused:
        parse_json(deep, max_depth=64)
    assert refused.value.param == "tools"


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    body = b'{"prompt": "' + b"[{" * 500 + b'"}'
    assert parse_json(body, max_depth=64)["prompt"].startswith("[{")


def test_nesting_past_the_parser_limit_is_a_json_error() -> None:
    with pytest.raises(InvalidRequest) as refused:
        parse_json(nested(5000), max_depth=64)
    assert refused.value.param is None


def test_a_long_token_array_is_one_input_but_many_strings_are_many() -> None:
    assert len(require_text_or_array({"input": list(range(10_000))}, "input", 2048)) == 10_000
    with pytest.raises(InvalidRequest) as refused:
        require_text_or_array({"input": ["x"] * 2049}, "input", 2048)
    assert refused.value.param == "input"


def test_arrays_are_capped_and_typed() -> None:
    optional_array({"tools": [{}] * 128}, "tools", 128)
    optional_array({}, "tools", 128)
    wrong: tuple[object, ...] = ([{}] * 129, {"type": "function"}, "tools")
    for value in wrong:
        with pytest.raises(InvalidRequest):
            optional_array({"tools": value}, "tools", 128)


@pytest.mark.parametrize("value", [0, -1, 2**31, 2**63, 2**64, 1.5, "5", True])
def test_token_counts_outside_their_range_are_refused(value: object) -> None:
    with pytest.raises(InvalidRequest) as refused:
        optional_positive_int({"max_tokens": value}, "max_tokens", 2**31 - 1)
    assert refused.value.param == "max_tokens"


def test_token_counts_inside_their_range_pass() -> None:
    assert optional_positive_int({"max_tokens": 2**31 - 1}, "max_tokens", 2**31 - 1) == 2**31 - 1
    assert optional_positive_int({}, "max_tokens", 2**31 - 1) is None


def test_a_credential_longer_than_any_key_is_refused_without_lookup() -> None:
    key = "rg-" + "a" * 12 + "-" + "b" * 32
    assert bounded_credential(key, MAX_API_KEY_CHARS) == key
    with pytest.raises(AuthenticationError):
        bounded_credential("rg-" + "a" * MAX_API_KEY_CHARS, MAX_API_KEY_CHARS)


def test_nul_characters_are_found_anywhere_in_a_body() -> None:
    refuse_nul({"name": "alice", "limits": {"rpm": 5}, "models": ["a", "b"]})
    for body in ({"name": "a\x00"}, {"metadata": {"k\x00": "v"}}, {"models": ["ok", ["deep\x00"]]}):
        with pytest.raises(InvalidRequest):
            refuse_nul(body)


@pytest.mark.parametrize("model", ["gpt\x00", "gpt\n4", "\x7f"])
def test_model_names_with_control_characters_are_refused(model: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        require_model({"model": model})
    assert refused.value.param == "model"


def test_stream_slots_cap_each_key_and_free_on_exit() -> None:
    slots = StreamSlots(2)
    with slots.hold("key_a"), slots.hold("key_a"):
        with pytest.raises(ConcurrencyLimited) as refused, slots.hold("key_a"):
            pass
        assert refused.value.retry_after is not None
        assert refused.value.status == 429
        with slots.hold("key_b"):
            assert slots.open_streams("key_b") == 1
    assert slots.open_streams("key_a") == 0


def test_a_stream_that_fails_gives_its_slot_back() -> None:
    slots = StreamSlots(1)
    with pytest.raises(RuntimeError), slots.hold("key_a"):
        raise RuntimeError("upstream vanished")
    with slots.hold("key_a"):
        assert slots.open_streams("key_a") == 1
