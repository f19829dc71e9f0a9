"""The launcher against a real tritonserver: start/stop, error paths, SIGTERM, the CLI as a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from tritonharness import tritonserver_available, write_model

from moss_speech.model_repository.launcher import (
    TritonServer,
    TritonStartError,
    find_binary,
    free_port,
    prepare_wheel_binary,
)

ADD_ONE = """
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "X").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", x + 1)]))
        return out
"""
ADD_ONE_CONFIG = """
backend: "python"
max_batch_size: 8
input [{ name: "X" data_type: TYPE_FP32 dims: [ -1 ] }]
output [{ name: "Y" data_type: TYPE_FP32 dims: [ -1 ] }]
"""


def needs_server(test):
    """A test that starts a real tritonserver: slow tier, skipped without one."""
    return pytest.mark.slow(pytest.mark.skipif(not tritonserver_available(), reason="no tritonserver")(test))


@pytest.fixture
def good_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    write_model(repo, "add_one", ADD_ONE_CONFIG, ADD_ONE)
    return repo


def http_add_one(http_url: str, values: list[float]) -> list[float]:
    body = {"inputs": [{"name": "X", "shape": [1, len(values)], "datatype": "FP32", "data": values}]}
    req = urllib.request.Request(
        f"http://{http_url}/v2/models/add_one/infer", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())["outputs"][0]["data"]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@needs_server
def test_start_infer_stop(good_repo: Path) -> None:
    with TritonServer(good_repo, http_port=None, grpc_port=None, metrics_port=None, stop_timeout=15) as srv:
        assert srv.is_ready()
        assert http_add_one(srv.http_url, [1.0, 2.5]) == [2.0, 3.5]
        assert "nv_inference_count" in srv.metrics()
        pid = srv.pid
        assert pid is not None
    assert srv.returncode == 0  # SIGTERM → Triton unloads models and exits 0
    assert not group_alive(pid), "python backend stubs outlived the server"


@needs_server
def test_sigterm_drains_and_exits_zero(triton_server, good_repo: Path) -> None:
    srv = triton_server(good_repo)
    t0 = time.monotonic()
    srv.send_signal(signal.SIGTERM)
    assert srv.wait(timeout=20) == 0
    assert time.monotonic() - t0 < 20
    assert any("successfully unloaded 'add_one'" in line for line in srv.logs())


@needs_server
def test_broken_model_fails_fast_with_logs(triton_server, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(
        repo,
        "broken",
        ADD_ONE_CONFIG,
        """
        class TritonPythonModel:
            def initialize(self, args):
                raise RuntimeError("toy model refuses to load")
        """,
    )
    t0 = time.monotonic()
    with pytest.raises(TritonStartError) as err:
        triton_server(repo)
    assert time.monotonic() - t0 < 45
    msg = str(err.value)
    assert "exited with code" in msg and "before ready" in msg
    assert "toy model refuses to load" in msg  # the server's own log line, so the cause is visible


@needs_server
def test_not_ready_timeout_stops_server(triton_server, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(
        repo,
        "slow",
        ADD_ONE_CONFIG,
        """
        import time

        class TritonPythonModel:
            def initialize(self, args):
                time.sleep(60)
        """,
    )
    ports = dict(http_port=None, grpc_port=None, metrics_port=None)
    srv = TritonServer(repo, **ports, ready_timeout=3, stop_timeout=5)
    with pytest.raises(TritonStartError, match="not ready after 3 s"):
        srv.start()
    assert srv.returncode is not None  # stopped, not left behind
    assert not group_alive(srv.pid)


def test_binary_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOSS_TRITONSERVER_BINARY", str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="nope"):
        find_binary()
    monkeypatch.setenv("PATH", str(tmp_path))  # no tritonserver on PATH
    with pytest.raises(FileNotFoundError, match="not on PATH"):
        find_binary("path")
    fake = tmp_path / "tritonserver"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    found = find_binary("auto")  # the container case: PATH wins over the wheel
    assert (found.kind, found.path) == ("path", fake)


@needs_server
def test_wheel_preparation_is_idempotent() -> None:
    try:
        first = prepare_wheel_binary()
    except FileNotFoundError:
        pytest.skip("nvidia-pytriton not installed")
    stub = first.path.parents[1] / "backends" / "python" / "triton_python_backend_stub"
    mtime = stub.stat().st_mtime_ns
    second = prepare_wheel_binary()
    assert stub.stat().st_mtime_ns == mtime  # not copied again
    assert first.env == second.env
    assert first.env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def _cli(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "moss_speech.cli.main", "triton", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@needs_server
def test_cli_serves_and_stops_on_sigterm(good_repo: Path) -> None:
    http, grpc, metrics = free_port(), free_port(), free_port()
    proc = _cli(
        ["--repo", str(good_repo), "--http-port", str(http), "--grpc-port", str(grpc),
         "--metrics-port", str(metrics), "--stop-timeout", "15", "--", "--log-info=true"]
    )  # fmt: skip
    out_lines: list[str] = []
    assert proc.stdout is not None and proc.stderr is not None
    drain = threading.Thread(target=lambda: out_lines.extend(proc.stdout), daemon=True)  # pipe must not fill
    drain.start()
    err_lines: list[str] = []
    try:
        for line in proc.stderr:  # the "ready" line comes after the readiness probe succeeded
            err_lines.append(line)
            if "moss-speech triton: ready" in line:
                break
        else:
            pytest.fail("CLI ended before ready:\n" + "".join(err_lines))
        assert http_add_one(f"127.0.0.1:{http}", [0.0]) == [1.0]
        proc.send_signal(signal.SIGTERM)
        err_lines += proc.stderr.readlines()
        proc.wait(timeout=25)
        drain.join(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = "".join(out_lines), "".join(err_lines)
    assert proc.returncode == 0, err
    assert f"--http-port={http}" in err and "--log-info=true" in err  # pass-through reached the command
    assert "successfully unloaded 'add_one'" in out  # server logs forwarded to stdout


@needs_server
def test_cli_reports_broken_repo(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_model(repo, "broken", ADD_ONE_CONFIG, "raise ImportError('no such toy dependency')\n")
    proc = _cli(["--repo", str(repo), "--http-port", str(free_port()), "--grpc-port", str(free_port()),
                 "--metrics-port", str(free_port())])  # fmt: skip
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "exited with code" in err and "no such toy dependency" in err
