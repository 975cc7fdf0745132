"""No service imports another service, except a process hosting one; the shared package imports no
service."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICES_DIR = Path(__file__).resolve().parents[2] / "services"
SERVICE_PACKAGES = ("auth", "quota", "relay", "logger", "catalog")
# The catalog has no process of its own: quota's composition root registers CatalogService on quota's
# gRPC server. Hosting is one-way and is all that is allowed: the catalog never imports quota, and no
# other service reaches into the catalog's code (clients use its gRPC stub).
HOSTED_BY = {"quota": {"catalog"}}


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
    allowed = HOSTED_BY.get(package, set())
    others = {f"services.{name}" for name in SERVICE_PACKAGES if name != package and name not in allowed}
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


def test_only_the_composition_root_imports_a_hosted_service() -> None:
    # Hosting means registering the servicer, not calling into the hosted service's store or models.
    offending = [
        (path, module)
        for host, hosted in HOSTED_BY.items()
        for path, module in imported_modules(host)
        if any(module == f"services.{h}" or module.startswith(f"services.{h}.") for h in hosted)
        and not path.endswith(f"services/{host}/app.py")
    ]
    assert not offending, f"only the composition root may import a hosted service: {offending}"
    assert any(module.startswith("services.catalog") for _, module in imported_modules("quota"))
