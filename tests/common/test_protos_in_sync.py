"""The checked-in stubs are exactly what the pinned generator makes from protos/."""

from __future__ import annotations

from pathlib import Path

from services.common.protogen import PACKAGE_ROOT, REPO_ROOT, generate


def test_generated_stubs_match_protos(tmp_path: Path) -> None:
    generated = {p.relative_to(tmp_path / PACKAGE_ROOT): p.read_bytes() for p in generate(tmp_path)}
    checked_in_dir = REPO_ROOT / PACKAGE_ROOT
    checked_in = {
        p.relative_to(checked_in_dir): p.read_bytes()
        for p in checked_in_dir.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sorted(map(str, checked_in)) == sorted(map(str, generated)), (
        "stub files differ from protos/: run `python -m services.common.protogen`"
    )
    drifted = [str(path) for path, content in generated.items() if checked_in[path] != content]
    assert not drifted, f"stale stubs {drifted}: run `python -m services.common.protogen`"
