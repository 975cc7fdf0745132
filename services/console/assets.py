"""The console's static files, read once from the package data when the relay starts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from importlib.resources.abc import Traversable
from types import MappingProxyType

_TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".svg": b"image/svg+xml",
    ".LICENSE": b"text/plain; charset=utf-8",
}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: bytes


def _walk(folder: Traversable, prefix: str) -> dict[str, Asset]:
    found: dict[str, Asset] = {}
    for entry in folder.iterdir():
        name = f"{prefix}{entry.name}"
        if entry.is_dir():
            found.update(_walk(entry, f"{name}/"))
            continue
        suffix = next((s for s in _TYPES if entry.name.endswith(s)), None)
        if suffix is not None:
            found[name] = Asset(entry.read_bytes(), _TYPES[suffix])
    return found


def load_assets() -> Mapping[str, Asset]:
    """Every servable file under ``static/`` by its path there (``"app.js"``, ``"vendor/uPlot.min.css"``)."""
    return MappingProxyType(_walk(resources.files("services.console") / "static", ""))
