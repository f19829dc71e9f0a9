"""tests/serving uses the session's shared tritonserver (`served`, tests/conftest.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tritonharness

from tritonharness import triton_server  # noqa: E402,F401  (pytest fixture)
