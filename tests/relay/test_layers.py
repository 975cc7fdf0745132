"""The relay's layers import one way: a front (``edge``) over the request ``pipeline`` over ``stream``,
``upstream`` and ``meter``; nothing below imports what sits above it. And the usage event, the record
of a request, is assembled in one module only, which every front feeds through the record's methods
(no other module assigns an attribute of an ``Exchange``).

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
# The two fronts stand side by side on the pipeline; only the composition root that starts them
# (the HTTP app's lifespan also runs the gRPC server) may name the other.
FRONTS = frozenset({"edge.http", "edge.grpc"})
COMPOSITION_ROOT = "edge.http.app"
# The one module that builds a UsageEvent, and the only one that sets an Exchange's fields.
RECORD = "meter.record"
RECORD_CLASS = "Exchange"


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


def _front(module: str) -> str:
    """The front (``edge.http`` or ``edge.grpc``) a module belongs to, else ``""``."""
    return next((front for front in FRONTS if module == front or module.startswith(front + ".")), "")


def violations(name: str, source: str, *, is_package: bool = False) -> list[str]:
    """Every import of ``name``'s ``source`` that goes against the layering."""
    layer = layer_of(name)
    wrong: list[str] = []
    for target in sorted(imported(name, ast.parse(source), is_package=is_package)):
        other = layer_of(target)
        if other == layer:
            front, target_front = _front(name), _front(target)
            if front and target_front and front != target_front and name != COMPOSITION_ROOT:
                wrong.append(f"{name} imports {target}")
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
        ("edge.grpc.servicer", "from services.relay.edge.http.headers import JSON\n"),
        ("edge.http.routes", "from services.relay.edge.grpc import status\n"),
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
        ("edge.http.app", "from services.relay.edge.grpc.server import grpc_front\n"),
        ("edge.grpc.servicer", "from services.relay.edge.grpc.status import refusal\n"),
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


def record_fields() -> frozenset[str]:
    """The fields of the request's record, read from its class."""
    tree = ast.parse((RELAY / "meter" / "record.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == RECORD_CLASS:
            return frozenset(
                item.target.id
                for item in node.body
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)
            )
    raise AssertionError(f"no class {RECORD_CLASS} in {RECORD}")


def _is_record_type(annotation: ast.expr | None) -> bool:
    """``Exchange``, ``Exchange | None`` or the same as a string."""
    if annotation is None:
        return False
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        return RECORD_CLASS in annotation.value.replace(" ", "").split("|")
    if isinstance(annotation, ast.BinOp):
        return _is_record_type(annotation.left) or _is_record_type(annotation.right)
    return isinstance(annotation, ast.Name) and annotation.id == RECORD_CLASS


def _opens_a_record(value: ast.expr | None) -> bool:
    """``Exchange(...)`` or ``Exchange.begin(...)``."""
    if not isinstance(value, ast.Call):
        return False
    func = value.func
    if isinstance(func, ast.Attribute):
        func = func.value
    return isinstance(func, ast.Name) and func.id == RECORD_CLASS


def _holder_names(tree: ast.Module) -> set[str]:
    """Names that hold a record in ``tree``: parameters and variables annotated with its class, and
    variables bound to a record just opened (besides any name that says ``exchange``)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and _is_record_type(node.annotation):
            names.add(node.arg)
        elif isinstance(node, ast.AnnAssign) and _is_record_type(node.annotation):
            if isinstance(node.target, ast.Name):
                names.add(node.target.id)
            elif isinstance(node.target, ast.Attribute):
                names.add(node.target.attr)
        elif isinstance(node, ast.Assign) and _opens_a_record(node.value):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names.add(target.id)
                elif isinstance(target, ast.Attribute):
                    names.add(target.attr)
    return names


def _holds_a_record(node: ast.expr, holders: set[str]) -> bool:
    name = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return bool(name) and (name in holders or "exchange" in name.lower())


def _written_field(target: ast.expr, fields: frozenset[str], holders: set[str]) -> str | None:
    """The record field ``target`` writes (``exchange.usage = ...``, ``exchange.usage.images = ...``,
    ``exchange.attempts += 1``, ``self._exchange.usage = ...``), else None."""
    while isinstance(target, ast.Attribute | ast.Subscript):
        if (
            isinstance(target, ast.Attribute)
            and target.attr in fields
            and _holds_a_record(target.value, holders)
        ):
            return target.attr
        target = target.value
    return None


def _targets(node: ast.AST) -> list[ast.expr]:
    """What ``node`` binds or deletes, tuples unpacked (``body, exchange.usage = ...``)."""
    found: list[ast.expr]
    if isinstance(node, ast.Assign | ast.Delete):
        found = list(node.targets)
    elif isinstance(node, ast.AugAssign | ast.For | ast.AsyncFor | ast.NamedExpr) or (
        isinstance(node, ast.AnnAssign) and node.value is not None
    ):
        found = [node.target]
    elif isinstance(node, ast.withitem) and node.optional_vars is not None:
        found = [node.optional_vars]
    else:
        return []
    flat: list[ast.expr] = []
    while found:
        target = found.pop()
        if isinstance(target, ast.Tuple | ast.List):
            found.extend(target.elts)
        elif isinstance(target, ast.Starred):
            found.append(target.value)
        else:
            flat.append(target)
    return flat


def record_writes(name: str, source: str, fields: frozenset[str]) -> list[str]:
    """Every place ``source`` sets a field of a record itself (assignment, augmented assignment,
    ``setattr`` or ``del``) instead of calling one of its methods; ``meter.record`` may."""
    if name == RECORD:
        return []
    tree = ast.parse(source)
    holders = _holder_names(tree)
    wrong: list[str] = []
    for node in ast.walk(tree):
        for target in _targets(node):
            field = _written_field(target, fields, holders)
            if field is not None:
                wrong.append(f"{name}:{getattr(node, 'lineno', 0)} sets {field}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"setattr", "delattr"}
            and node.args
            and _holds_a_record(node.args[0], holders)
        ):
            wrong.append(f"{name}:{node.lineno} calls {node.func.id} on a record")
    return wrong


def test_only_the_record_sets_its_fields() -> None:
    fields = record_fields()
    assert {"usage", "attempts", "end_reason", "charged_micros"} <= fields
    wrong: list[str] = []
    for name, path in relay_modules().items():
        wrong += record_writes(name, path.read_text(), fields)
    assert wrong == []


@pytest.mark.parametrize(
    "source",
    [
        "def f(exchange: Exchange) -> None:\n    exchange.usage = None\n",
        "def f(exchange: Exchange) -> None:\n    exchange.attempts += 1\n",
        "def f(exchange: Exchange) -> None:\n    body, exchange.usage = g()\n",
        "def f(exchange: Exchange) -> None:\n    exchange.usage.images = 2\n",
        "def f(self) -> None:\n    self._exchange.end_reason = 'done'\n",
        "def f(record: Exchange | None) -> None:\n    record.charged_micros = 5\n",
        "def f(record: 'Exchange') -> None:\n    record.price = None\n",
        "def f() -> None:\n    ex = Exchange.begin(endpoint='e', client_ip='')\n    ex.model = 'm'\n",
        "def f(exchange: Exchange) -> None:\n    setattr(exchange, 'model', 'm')\n",
        "def f(exchange: Exchange) -> None:\n    del exchange.usage\n",
    ],
)
def test_a_write_to_a_record_field_is_caught(source: str) -> None:
    assert record_writes("pipeline.relay", source, record_fields())


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("pipeline.relay", "def f(exchange: Exchange) -> None:\n    exchange.delivered(g())\n"),
        ("pipeline.relay", "def f(exchange: Exchange) -> int:\n    return exchange.attempts\n"),
        # Another object's attribute of the same name is not the record's.
        ("stream.sse", "def f(self) -> None:\n    self.usage = None\n"),
        ("meter.record", "def f(self) -> None:\n    self.usage = None\n"),
    ],
)
def test_reading_a_record_or_setting_another_object_is_allowed(name: str, source: str) -> None:
    assert record_writes(name, source, record_fields()) == []
