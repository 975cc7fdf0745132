"""``relaygate admin``: answers print as readable tables (money in units and micro-units), ``--json``
prints the API's answer, and every command and option has help text."""

from __future__ import annotations

import argparse

import pytest

from services import cli
from services.admin_tables import money, render


def test_money_is_shown_in_units_and_micro_units_exactly() -> None:
    assert money(12_500_000) == "12.500000 (12,500,000 µ)"
    assert money(0) == "0.000000 (0 µ)"
    assert money(-3) == "-0.000003 (-3 µ)"
    # Beyond a double's exact integers: no rounding.
    assert money(9_007_199_254_740_993) == "9,007,199,254.740993 (9,007,199,254,740,993 µ)"


def test_one_object_prints_field_and_value_rows() -> None:
    shown = render(
        {
            "user_id": "usr_1",
            "balance_micros": "12500000",
            "limits": {"rpm": "600", "daily_budget_micros": 2000000},
        }
    ).splitlines()
    assert shown[0].split() == ["FIELD", "VALUE"]
    assert "balance_micros              12.500000 (12,500,000 µ)" in shown
    assert any(line.split()[:2] == ["limits.rpm", "600"] for line in shown)
    assert any(
        line.startswith("limits.daily_budget_micros") and "2.000000 (2,000,000 µ)" in line for line in shown
    )


def test_a_listing_prints_a_table_with_its_count_and_cursor() -> None:
    shown = render(
        {
            "prices": [
                {
                    "model": "gpt-4o",
                    "input_per_mtok": "2500000",
                    "output_per_mtok": "10000000",
                    "per_image": "0",
                },
                {"model": "mini", "input_per_mtok": "150000", "output_per_mtok": "600000", "per_image": "0"},
            ],
            "next_cursor": "abc",
        }
    ).splitlines()
    assert shown[0].split() == ["MODEL", "INPUT_PER_MTOK", "OUTPUT_PER_MTOK"]  # all-zero columns left out
    assert shown[2].startswith("gpt-4o  2.500000 (2,500,000 µ)")
    assert shown[-2:] == ["(2 prices)", "next_cursor: abc"]
    assert render({"keys": []}) == "no keys"


def test_times_and_long_values_stay_readable() -> None:
    shown = render({"logs": [{"request_id": "r" * 80, "occurred_at_ms": "1796303474253", "stream": True}]})
    assert "2026-12-03 13:11:14.253Z" in shown
    assert "r" * 47 + "…" in shown and "r" * 48 not in shown
    assert "yes" in shown


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relaygate")
    commands = parser.add_subparsers(dest="command")
    from services import admin_client

    admin_client.add_parser(commands)
    return parser


def _walk(parser: argparse.ArgumentParser, path: str) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:  # argparse keeps no public list of sub-commands
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                assert helps.get(name), f"`{path} {name}` has no help text"
                found += _walk(sub, f"{path} {name}")
    return found


def test_every_admin_command_and_option_has_help() -> None:
    commands = _walk(_parser(), "relaygate")
    assert len(commands) > 20
    for path, parser in commands:
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
                continue
            assert action.help, f"`{path}` {action.option_strings or action.dest} has no help text"


def test_json_is_an_option_of_admin() -> None:
    args = _parser().parse_args(["admin", "--json", "prices", "list"])
    assert args.json is True
    assert _parser().parse_args(["admin", "prices", "list"]).json is False


def test_admin_help_describes_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["admin", "--help"])
    out = capsys.readouterr().out
    assert "--json" in out and "budgets" in out and "spending caps" in out
