"""The contract imports nothing but pydantic and numpy (and the standard library)."""

import subprocess
import sys

FORBIDDEN = (
    "torch",
    "soundfile",
    "soxr",
    "grpc",
    "tritonclient",
    "onnx",
    "onnxruntime",
    "jinja2",
    "moss_speech.builders",
    "moss_speech.services",
    "moss_speech.model_repository",
)
MODULES = ("audio", "docs", "metrics", "sampling", "serving", "streaming", "tensors", "window")


def test_contract_is_light():
    code = (
        "import sys; "
        + "; ".join(f"import moss_speech.contract.{m}" for m in MODULES)
        + "; print('\\n'.join(sorted(sys.modules)))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    bad = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert not bad, f"the contract pulled in {bad}"
