import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for tritonharness

from tritonharness import triton_server  # noqa: E402,F401  (pytest fixture)


@pytest.fixture(scope="module")
def served(cpu_repo, request):
    """One real tritonserver for the module, serving the CPU repository."""
    from moss_speech.model_repository.launcher import TritonServer

    srv = TritonServer(cpu_repo, http_port=None, grpc_port=None, metrics_port=None, ready_timeout=300)
    srv.start()
    yield srv
    srv.stop()
