"""The service as a `moss-speech serve` subprocess and tritonserver start/restart helpers, for tests/service
(a module of its own: test modules import it by name, which `conftest` is not across test folders)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # .../tests, for tritonharness
from tritonharness import metric, stop_process  # noqa: E402

from moss_speech.model_repository.launcher import TritonServer, free_port  # noqa: E402

# Small limits so every limit is reachable with small inputs.
SERVICE_ENV = {
    "MOSS_SPEECH_MAX_AUDIO_SECONDS": "5",
    "MOSS_SPEECH_MAX_MESSAGE_BYTES": str(1024 * 1024),
    "MOSS_SPEECH_MAX_TEXT_CHARS": "200",
    "MOSS_SPEECH_MAX_CONTEXT_TOKENS": "128",
    "MOSS_SPEECH_MAX_NEW_TOKENS": "8",
    "MOSS_SPEECH_HEALTH_CHECK_SECONDS": "0.3",
    "MOSS_SPEECH_REQUEST_TIMEOUT_SECONDS": "60",
    "MOSS_SPEECH_LOG_FORMAT": "json",
    # The shared test service runs without TLS and keys, explicitly (tests/service/test_service_security.py
    # starts its own secured services).
    "MOSS_SPEECH_PLAINTEXT": "true",
    "MOSS_SPEECH_AUTH": "none",
    "MOSS_SPEECH_REFLECTION": "true",  # off by default; test_service_e2e checks it works when on
}


def start_triton(repo: Path, **ports: int | None) -> TritonServer:
    srv = TritonServer(
        repo,
        ready_timeout=180,
        stop_timeout=20,
        **{"http_port": None, "grpc_port": None, "metrics_port": None, **ports},
    )
    return srv.start()


def restart_triton(srv: TritonServer) -> TritonServer:
    """A fresh server on the same repository and ports (a TritonServer object starts once)."""
    return start_triton(srv.repo, http_port=srv.http_port, grpc_port=srv.grpc_port, metrics_port=srv.metrics_port)


class ServiceProcess:
    """`moss-speech serve` in a subprocess; logs (JSON lines) go to a file."""

    def __init__(self, triton_url: str, log_path: Path, **env: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.log_path = log_path
        self.env = {
            **os.environ,
            **SERVICE_ENV,
            **env,
            "MOSS_SPEECH_TRITON_URL": triton_url,
            "MOSS_SPEECH_GRPC_PORT": str(self.port),
            "MOSS_SPEECH_METRICS_PORT": str(self.metrics_port),
        }
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"localhost:{self.port}"

    def start(self, wait_serving: bool = True) -> ServiceProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moss_speech.cli.main", "serve"],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        if wait_serving:
            self.wait_health("SERVING", timeout=60)
        return self

    def health(self) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        # A TLS service is probed on its plaintext health-only port (MOSS_SPEECH_HEALTH_PORT), as kubelet does.
        port = self.env.get("MOSS_SPEECH_HEALTH_PORT")
        with grpc.insecure_channel(f"localhost:{port}" if port else self.address) as ch:
            try:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            except grpc.RpcError as e:
                return e.code().name
            return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def wait_health(self, status: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"service exited {self.proc.returncode}:\n{self.logs()}")
            last = self.health()
            if last == status:
                return
            time.sleep(0.2)
        raise TimeoutError(f"health stayed {last}, wanted {status}\n{self.logs()[-3000:]}")

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://localhost:{self.metrics_port}/metrics", timeout=5).read().decode()

    def metric(self, name: str, **labels: str) -> float:
        return metric(self.metrics(), name, **labels) or 0.0

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        code = stop_process(self.proc, 30) if self.proc is not None else None
        self._log.close()
        return code
