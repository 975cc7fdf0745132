"""``python -m services.fake_upstream``: serve the fake upstream in the foreground.

Prints ``listening on http://HOST:PORT`` on stdout once connections are accepted (``--port 0``
picks a free port) and exits 0 after a clean shutdown on SIGTERM or SIGINT.

Every :class:`.Behaviour` field is a flag (``latency_ms`` -> ``--latency-ms``) and an environment
variable (``FAKE_UPSTREAM_LATENCY_MS``), flags winning. Values use the text form of
:func:`.behaviour.parse_text`: booleans ``true/false``, ``none`` for unset optional fields, comma
separated ``--models``. ``--host`` / ``--port`` default to ``FAKE_UPSTREAM_HOST`` /
``FAKE_UPSTREAM_PORT``, else ``127.0.0.1`` / ``8099``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping, Sequence

from .behaviour import Behaviour, BehaviourError, parse_text
from .server import serve

ENV_PREFIX = "FAKE_UPSTREAM_"
DEFAULT_PORT = 8099


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.fake_upstream",
        description=(
            "Fake LLM provider (OpenAI, Azure OpenAI, Anthropic, Gemini formats) for tests, demos and "
            "benchmarks (loopback only)."
        ),
    )
    parser.add_argument("--host", default=None, help="loopback address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=None, help=f"port, 0 for any free one (default {DEFAULT_PORT})"
    )
    defaults = Behaviour()
    for spec in dataclasses.fields(Behaviour):
        default = getattr(defaults, spec.name)
        shown = ",".join(default) if isinstance(default, list) else default
        # A bare boolean flag (`--hang`) means true.
        flag = isinstance(default, bool)
        parser.add_argument(
            "--" + spec.name.replace("_", "-"),
            dest=spec.name,
            metavar="VALUE",
            default=None,
            nargs="?" if flag else None,
            const="true" if flag else None,
            help=f"behaviour field {spec.name} (default {shown})",
        )
    return parser


def behaviour_from(args: argparse.Namespace, environ: Mapping[str, str]) -> Behaviour:
    """The behaviour given by flags, falling back to ``FAKE_UPSTREAM_*`` variables, then defaults."""
    changes = {}
    for spec in dataclasses.fields(Behaviour):
        text = getattr(args, spec.name)
        if text is None:
            text = environ.get(ENV_PREFIX + spec.name.upper())
        if text is not None:
            changes[spec.name] = parse_text(spec.name, text)
    behaviour = Behaviour()
    behaviour.update(changes)
    return behaviour


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        behaviour = behaviour_from(args, os.environ)
    except BehaviourError as error:
        parser.error(str(error))
    host = args.host or os.environ.get(ENV_PREFIX + "HOST") or "127.0.0.1"
    port = args.port if args.port is not None else int(os.environ.get(ENV_PREFIX + "PORT") or DEFAULT_PORT)

    def announce(url: str) -> None:
        print(f"listening on {url}", flush=True)

    try:
        serve(behaviour, host=host, port=port, on_started=announce)
    except (OSError, ValueError) as error:
        print(f"fake upstream: cannot listen on {host}:{port}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
