"""`python -m moss_speech.services.api [--out DIR]`: (re)generate the API stubs from the .proto files."""

from __future__ import annotations

import argparse
from pathlib import Path

from moss_speech.services.api import GEN_DIR, generate, proto_root

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proto-root", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=GEN_DIR)
    args = parser.parse_args()
    for path in generate(args.proto_root or proto_root(), args.out):
        print(path)
