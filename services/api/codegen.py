"""protoc for the API: writes flat `_gen/` stubs from `proto/moss_speech/v1/*.proto`.

Standalone (stdlib + grpcio-tools only) so setup.py can run it at build time without importing the package.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

GEN_DIR = Path(__file__).resolve().parent / "_gen"
PROTO_PACKAGE = "moss_speech/v1"
PROTO_FILES = ("speech.proto",)


def proto_root() -> Path:
    """The folder that holds `moss_speech/v1/*.proto`: `$MOSS_SPEECH_PROTO_ROOT`, else the checkout's proto/."""
    env = os.environ.get("MOSS_SPEECH_PROTO_ROOT")
    if env:
        return Path(env)
    # services/api/__init__.py -> <checkout>/proto (an editable install imports from the checkout)
    return Path(__file__).resolve().parents[2] / "proto"


def _stale(root: Path) -> bool:
    for name in PROTO_FILES:
        src = root / PROTO_PACKAGE / name
        stem = name.removesuffix(".proto")
        for out in (GEN_DIR / f"{stem}_pb2.py", GEN_DIR / f"{stem}_pb2_grpc.py"):
            if not out.exists():
                return True
            if src.exists() and src.stat().st_mtime > out.stat().st_mtime:
                return True
    return False


def generate(root: Path | None = None, out: Path = GEN_DIR) -> list[Path]:
    """Run protoc on the .proto files into `out`; atomic per file (several processes may import at once)."""
    from grpc_tools import protoc  # noqa: PLC0415 - only needed when (re)generating

    root = root or proto_root()
    sources = [root / PROTO_PACKAGE / name for name in PROTO_FILES]
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise FileNotFoundError(f"API .proto files not found: {missing} (set MOSS_SPEECH_PROTO_ROOT)")
    include = Path(protoc.__file__).parent / "_proto"  # google/protobuf/*.proto shipped with grpcio-tools
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        args = [
            "protoc",
            f"-I{root}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *map(str, sources),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        for path in sorted((Path(tmp) / PROTO_PACKAGE).iterdir()):
            text = path.read_text()
            # flat layout: sibling modules import each other relatively
            text = re.sub(r"^from moss_speech\.v1 import (\w+)", r"from . import \1", text, flags=re.M)
            staged = Path(tmp) / path.name
            staged.write_text(text)
            os.replace(staged, out / path.name)
            written.append(out / path.name)
    (out / "__init__.py").touch()
    return written
