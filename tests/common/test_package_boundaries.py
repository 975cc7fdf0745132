"""No service imports another service; the shared package imports no service."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICES_DIR = Path(__file__).resolve().parents[2] / "services"
SERVICE_PACKAGES = ("auth", "quota", "relay", "logger")


def imported_modules(package: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for path in sorted((SERVICES_DIR / package).rglob("*.py")):
        if "pb" in path.relative_to(SERVICES_DIR).parts:
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [(str(path), alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.append((str(path), node.module))
    return found


@pytest.mark.parametrize("package", SERVICE_PACKAGES)
def test_service_imports_only_common(package: str) -> None:
    others = {f"services.{name}" for name in SERVICE_PACKAGES if name != package}
    offending = [
        (path, module)
        for path, module in imported_modules(package)
        if any(module == o or module.startswith(o + ".") for o in others)
    ]
    assert not offending, f"services.{package} imports another service: {offending}"


def test_common_imports_no_service() -> None:
    offending = [
        (path, module)
        for path, module in imported_modules("common")
        if any(module == f"services.{s}" or module.startswith(f"services.{s}.") for s in SERVICE_PACKAGES)
    ]
    assert not offending, f"services.common must not depend on a service: {offending}"


def test_the_check_sees_imports() -> None:
    # Guards the guard: if the walk found nothing, the tests above would pass vacuously.
    assert any(module.startswith("services.common") for _, module in imported_modules("relay"))
