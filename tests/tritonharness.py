"""Reusable pieces for tests that need a real tritonserver.

Use from any test folder's conftest.py (tests/ is not a package, so put it on sys.path first):

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # .../tests
    from tritonharness import triton_server  # noqa: E402,F401  (pytest fixture)

then in a test:

    def test_x(triton_server, tmp_path):
        srv = triton_server(repo_dir)                 # free ports, waits until ready, stopped at teardown
        client = tritonclient.grpc.InferenceServerClient(srv.grpc_url)

Tests are skipped (not failed) when no tritonserver can be found (no `triton-local` extra, none on PATH).
"""

from __future__ import annotations

import queue
import re
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moss_speech.model_repository.launcher import TritonServer, find_binary

StartServer = Callable[..., TritonServer]


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> int | None:
    """SIGTERM a helper process (service, gateway, redis-server), SIGKILL it if it outlives `timeout`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def tritonserver_available() -> bool:
    try:
        find_binary()
    except FileNotFoundError:
        return False
    return True


@pytest.fixture
def triton_server(request: pytest.FixtureRequest) -> Iterator[StartServer]:
    """Factory: `triton_server(repo, **TritonServer kwargs)` starts a server on free ports, waits for ready.

    Every server started is stopped at teardown; its last log lines are printed (shown on failure).
    """
    if not tritonserver_available():
        pytest.skip("no tritonserver (install the triton-local extra or run inside NVIDIA's container)")
    started: list[TritonServer] = []

    def start(repo: str | Path, **kwargs: Any) -> TritonServer:
        kwargs.setdefault("http_port", None)
        kwargs.setdefault("grpc_port", None)
        kwargs.setdefault("metrics_port", None)
        kwargs.setdefault("ready_timeout", 60.0)
        kwargs.setdefault("stop_timeout", 15.0)
        srv = TritonServer(repo, **kwargs)
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop()
        print(f"--- tritonserver {srv.grpc_url} last log lines ---")
        print("\n".join(srv.logs(60)))


def write_model(repo: Path, name: str, config: str, model_py: str | None = None) -> Path:
    """Write `repo/name/config.pbtxt` (and `1/model.py` for python models); returns the model folder."""
    folder = repo / name
    (folder / "1").mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(textwrap.dedent(config).strip() + "\n")
    if model_py is not None:
        (folder / "1" / "model.py").write_text(textwrap.dedent(model_py).lstrip())
    return folder


_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][\w:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)$")


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text format → (name, labels, value) samples."""
    samples = []
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if not m or line.startswith("#"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m["labels"] or ""))
        samples.append((m["name"], labels, float(m["value"])))
    return samples


def metric(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples of `name` whose labels include `labels`; None when there is none."""
    values = [v for n, lab, v in parse_metrics(text) if n == name and labels.items() <= lab.items()]
    return sum(values) if values else None


class Stream:
    """One tritonclient.grpc bidi stream collecting (result, error) pairs; one client per stream."""

    def __init__(self, grpc_url: str) -> None:
        import tritonclient.grpc as grpcclient  # noqa: PLC0415 - keep import cost out of collection

        self.client = grpcclient.InferenceServerClient(grpc_url)
        self.events: queue.Queue[tuple[Any, Any]] = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.events.put((result, error)))

    def send(self, model: str, inputs: dict[str, np.ndarray], request_id: str = "", **kwargs: Any) -> None:
        import tritonclient.grpc as grpcclient  # noqa: PLC0415

        tensors = []
        for name, value in inputs.items():
            t = grpcclient.InferInput(name, list(value.shape), _triton_dtype(value))
            t.set_data_from_numpy(value)
            tensors.append(t)
        self.client.async_stream_infer(
            model, tensors, request_id=request_id, enable_empty_final_response=True, **kwargs
        )

    def next(self, timeout: float = 10.0) -> tuple[Any, Any]:
        return self.events.get(timeout=timeout)

    def collect(self, timeout: float = 20.0) -> list[Any]:
        """Results until the final flag (raises on an error response or timeout)."""
        results = []
        deadline = time.monotonic() + timeout
        while True:
            result, error = self.next(max(0.1, deadline - time.monotonic()))
            if error is not None:
                raise RuntimeError(f"stream error: {error}")
            results.append(result)
            if is_final(result):
                return results

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def is_final(result: Any) -> bool:
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


def has_outputs(result: Any) -> bool:
    return len(result.get_response().outputs) > 0


def _triton_dtype(value: np.ndarray) -> str:
    if value.dtype == np.object_ or value.dtype.kind in "SU":
        return "BYTES"
    return {np.float32: "FP32", np.int32: "INT32", np.int64: "INT64", np.bool_: "BOOL"}[value.dtype.type]
