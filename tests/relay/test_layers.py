"""The relay's layers import one way: a front (``edge``) over the request ``pipeline`` over ``stream``,
``upstream`` and ``meter``; nothing below imports what sits above it. And the usage event, the record
of a request, is assembled in one module only, which every front feeds.

Read from the sources with :mod:`ast` (imports under ``TYPE_CHECKING`` and inside functions count
too), so a new module or a new import is checked without being listed here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import services.relay

RELAY = Path(services.relay.__file__).parent
PACKAGE = "services.relay"

# What each layer may import from the relay, besides itself and the shared top-level modules.
ALLOWED: dict[str, frozenset[str]] = {
    "edge": frozenset({"formats", "pipeline", "stream", "upstream", "meter"}),
    # The inbound formats convert around the pipeline; the edge wires them to it.
    "formats": frozenset({"pipeline", "stream", "providers", "meter"}),
    "pipeline": frozenset({"stream", "upstream", "providers", "meter"}),
    "stream": frozenset({"upstream", "providers", "meter"}),
    "upstream": frozenset({"providers", "meter"}),
    # The provider adapters convert bodies and streams; they know nothing of requests in flight.
    "providers": frozenset(),
    "meter": frozenset(),
}
# Top-level modules every layer may use; they import no layer themselves.
SHARED = frozenset({"settings"})
# The process entry point wires the HTTP edge; nothing imports it.
ENTRY = "__main__"
# The one module that builds a UsageEvent.
RECORD = "meter.record"


def module_name(path: Path) -> str:
    relative = path.relative_to(RELAY).with_suffix("")
    parts = [p for p in relative.parts if p != "__init__"]
    return ".".join(parts)


def relay_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(RELAY.rglob("*.py"))}


def imported(name: str, tree: ast.Module, *, is_package: bool) -> set[str]:
    """The relay modules (names under ``services.relay``) that ``tree`` imports."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = f"{PACKAGE}.{name}".split(".")
                anchor = here if is_package else here[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from package import module`` names modules; ``from module import name`` names the module.
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            if target.startswith(PACKAGE + "."):
                found.add(target[len(PACKAGE) + 1 :])
    return found


def layer_of(module: str) -> str:
    return module.split(".", 1)[0]


def violations(name: str, source: str, *, is_package: bool = False) -> list[str]:
    """Every import of ``name``'s ``source`` that goes against the layering."""
    layer = layer_of(name)
    wrong: list[str] = []
    for target in sorted(imported(name, ast.parse(source), is_package=is_package)):
        other = layer_of(target)
        if other == layer:
            continue
        if name == ENTRY:
            allowed = other == "edge" or other in SHARED
        elif layer in SHARED:
            allowed = False
        elif other in SHARED:
            allowed = True
        else:
            allowed = other in ALLOWED.get(layer, frozenset())
        if not allowed:
            wrong.append(f"{name} imports {target}")
    return wrong


def test_every_module_belongs_to_a_layer() -> None:
    for name in relay_modules():
        layer = layer_of(name)
        assert not name or layer in ALLOWED or layer in SHARED or name == ENTRY, name


def test_imports_go_one_way() -> None:
    wrong: list[str] = []
    for name, path in relay_modules().items():
        if not name:
            continue
        wrong += violations(name, path.read_text(), is_package=path.name == "__init__.py")
    assert wrong == []


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("meter.accounting", "from services.relay.edge.http.routes import Call\n"),
        ("stream.streaming", "from services.relay.edge.http import openai_errors\n"),
        ("upstream.proxy", "if TYPE_CHECKING:\n    from services.relay.pipeline.gateway import Gateway\n"),
        ("pipeline.relay", "def f() -> None:\n    import services.relay.edge.http.front\n"),
        ("upstream.proxy", "from ..stream.sse import StreamScanner\n"),
        ("settings", "from services.relay.meter.usage import from_body\n"),
    ],
)
def test_an_import_against_the_layers_is_caught(name: str, source: str) -> None:
    assert violations(name, source)


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("edge.http.routes", "from services.relay.pipeline import relay as pipeline\n"),
        ("pipeline.relay", "from services.relay.stream.streaming import StreamRelay\n"),
        ("upstream.proxy", "from services.relay.meter.record import Exchange\n"),
        ("meter.record", "from services.relay.settings import RelaySettings\n"),
    ],
)
def test_an_import_down_the_layers_is_allowed(name: str, source: str) -> None:
    assert violations(name, source) == []


def test_the_usage_event_is_built_in_one_module() -> None:
    builders = set()
    for name, path in relay_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                if called == "UsageEvent":
                    builders.add(name)
    assert builders == {RECORD}
