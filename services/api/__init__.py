"""Python stubs of the public API, generated from `proto/moss_speech/v1/*.proto` with grpcio-tools.

Nothing here is hand-written protobuf code: on import, `ensure_generated()` runs `grpc_tools.protoc` into
`services/api/_gen/` (gitignored) when a generated file is missing or older than its .proto, then the modules are
imported from there. Run `python -m moss_speech.services.api` to generate ahead of time (e.g. in an image build,
where the installed package may be read-only at run time).

protoc writes `from moss_speech.v1 import speech_pb2` into the grpc module; that would collide with our own
`moss_speech` import root, so the generated files are laid out flat in `_gen/` and that one import is made
relative.
"""

from __future__ import annotations

import os
import re
import tempfile
from importlib import import_module
from pathlib import Path
from types import ModuleType

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
        args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={tmp}", f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}", *map(str, sources)]
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


def ensure_generated() -> None:
    root = proto_root()
    if not root.exists():
        if not _stale(Path("/nonexistent")):
            return  # installed without the .proto: use what was generated at build time
        raise FileNotFoundError(f"no generated API stubs and no .proto at {root}")
    if _stale(root):
        generate(root)


ensure_generated()
speech_pb2: ModuleType = import_module(f"{__name__}._gen.speech_pb2")
speech_pb2_grpc: ModuleType = import_module(f"{__name__}._gen.speech_pb2_grpc")

SERVICE_NAME = speech_pb2.DESCRIPTOR.services_by_name["MossSpeech"].full_name

__all__ = ["SERVICE_NAME", "generate", "speech_pb2", "speech_pb2_grpc"]
