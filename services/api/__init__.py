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

from importlib import import_module
from pathlib import Path
from types import ModuleType

from moss_speech.services.api.codegen import GEN_DIR, _stale, generate, proto_root


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

__all__ = ["GEN_DIR", "SERVICE_NAME", "generate", "proto_root", "speech_pb2", "speech_pb2_grpc"]
