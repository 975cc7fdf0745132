"""Generate the Python stubs in ``services/common/pb`` from ``protos/``.

``python -m services.common.protogen`` rewrites the checked-in stubs; the drift test calls
:func:`generate` into a temporary directory and compares byte for byte. The generator versions are
pinned in pyproject's ``dev`` extra so that every machine produces the same bytes.
"""

from __future__ import annotations

import re
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from grpc_tools import protoc

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
PACKAGE_ROOT = Path("services/common/pb")


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def _plugin(name: str) -> str:
    scripts = Path(sysconfig.get_path("scripts"))
    found = scripts / name
    if not found.exists():
        located = shutil.which(name)
        if located is None:
            raise RuntimeError(f"{name} not found; install the project's dev extra (mypy-protobuf)")
        return located
    return str(found)


# protoc names imports after the proto package ("from relaygate.common.v1 import ..."); the stubs
# live inside our package, so those absolute imports are rewritten (protobuf issue #1491).
_IMPORT = re.compile(r"^(from|import) relaygate\.", re.MULTILINE)


def generate(out_root: Path) -> list[Path]:
    """Write generated modules for every proto under ``out_root/services/common/pb``."""
    builtin_protos = Path(protoc.__file__).parent / "_proto"
    package_dir = out_root / PACKAGE_ROOT
    package_dir.mkdir(parents=True, exist_ok=True)
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{builtin_protos}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={package_dir}",
        f"--grpc_python_out={package_dir}",
        f"--mypy_out={package_dir}",
        f"--mypy_grpc_out={package_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    for module in package_dir.rglob("*.py*"):
        text = module.read_text()
        module.write_text(_IMPORT.sub(r"\1 services.common.pb.relaygate.", text))
    for directory in [package_dir, *[d for d in package_dir.rglob("*") if d.is_dir()]]:
        (directory / "__init__.py").touch()
    return sorted(p for p in package_dir.rglob("*") if p.is_file())


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        generated = generate(Path(tmp))
        target = REPO_ROOT / PACKAGE_ROOT
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(Path(tmp) / PACKAGE_ROOT, target)
    print(f"wrote {len(generated)} files to {PACKAGE_ROOT}")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
