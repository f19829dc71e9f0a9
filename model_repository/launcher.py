"""Start a real Triton Inference Server on a model repository: `TritonServer` and `moss-speech triton`.

Two ways to get a `tritonserver` binary:
- "path": `tritonserver` on PATH, as inside NVIDIA's container (nvcr.io/nvidia/tritonserver:<yy.mm>-py3);
- "wheel": the 2.51 binary bundled in the `nvidia-pytriton` wheel (extra `triton-local`), for CPU laptops/CI.
  It needs the Python backend stub for this interpreter copied next to the backend, its bundled libraries on
  LD_LIBRARY_PATH, and this interpreter's bin/ first on PATH (the stub imports packages from the `python3` it
  finds there). `prepare_wheel_binary` does all of that, idempotently.
"auto" picks "path" when a `tritonserver` is on PATH, else "wheel". Override with `--server-binary` or
`MOSS_TRITONSERVER_BINARY` (auto|path|wheel|/explicit/path/to/tritonserver).
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

BINARY_ENV = "MOSS_TRITONSERVER_BINARY"
DEFAULT_PORTS = (8000, 8001, 8002)


class TritonStartError(RuntimeError):
    """The server died or never became ready; the message carries its last log lines."""


@dataclass
class ServerBinary:
    """A tritonserver executable and the environment/arguments it needs."""

    path: Path
    kind: str  # "wheel" | "path" | "explicit"
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)  # e.g. --backend-directory for the wheel


def _pytriton_root() -> Path | None:
    try:
        import pytriton  # noqa: PLC0415 - optional dependency (extra `triton-local`)
    except ImportError:
        return None
    root = Path(pytriton.__file__).parent / "tritonserver"
    return root if (root / "bin" / "tritonserver").exists() else None


def _copy_if_different(src: Path, dst: Path) -> None:
    if dst.exists() and dst.stat().st_size == src.stat().st_size and dst.read_bytes() == src.read_bytes():
        return
    # Copy to a temp name and rename: several test workers may prepare the same venv at once.
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.copy2(src, tmp)
    os.chmod(tmp, 0o755)
    os.replace(tmp, dst)


def prepare_wheel_binary() -> ServerBinary:
    """Make the nvidia-pytriton tritonserver runnable here (stub copy, env) and describe how to start it."""
    root = _pytriton_root()
    if root is None:
        raise FileNotFoundError(
            "no tritonserver: install the `triton-local` extra (nvidia-pytriton) or put tritonserver on PATH"
        )
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.exists():
        raise FileNotFoundError(f"nvidia-pytriton ships no python backend stub for Python {py}: {stub}")
    backends = root / "backends"
    _copy_if_different(stub, backends / "python" / "triton_python_backend_stub")
    libs = root.parent.parent / "nvidia_pytriton.libs"  # auditwheel's vendored shared libraries
    env = {
        "LD_LIBRARY_PATH": _prepend(str(libs), os.environ.get("LD_LIBRARY_PATH")),
        # The stub runs `python3` from PATH to find site-packages: make that this interpreter's venv.
        "PATH": _prepend(str(Path(sys.executable).parent), os.environ.get("PATH")),
    }
    return ServerBinary(root / "bin" / "tritonserver", "wheel", env, [f"--backend-directory={backends}"])


def _prepend(item: str, value: str | None) -> str:
    parts = [p for p in (value or "").split(os.pathsep) if p and p != item]
    return os.pathsep.join([item, *parts])


def find_binary(choice: str | None = None) -> ServerBinary:
    """Resolve `choice` (auto|path|wheel|explicit path; default from $MOSS_TRITONSERVER_BINARY, else auto)."""
    choice = choice or os.environ.get(BINARY_ENV) or "auto"
    if choice in ("auto", "path"):
        found = shutil.which("tritonserver")
        if found:
            return ServerBinary(Path(found), "path")
        if choice == "path":
            raise FileNotFoundError("tritonserver is not on PATH")
        return prepare_wheel_binary()
    if choice == "wheel":
        return prepare_wheel_binary()
    path = Path(choice)
    if not path.is_file():
        raise FileNotFoundError(f"tritonserver binary not found: {path}")
    return ServerBinary(path, "explicit")


def trace_args(otlp_url: str, service_name: str = "triton", export_delay_ms: int | None = None) -> list[str]:
    """tritonserver flags for OpenTelemetry tracing, exported by OTLP/HTTP to `otlp_url`/v1/traces.

    rate=0 traces only requests that carry a W3C `traceparent` (the service decides what is sampled);
    Triton 2.51 then parents its request, model and compute spans on the caller's span.
    """
    cmd = [
        "--trace-config=mode=opentelemetry",
        "--trace-config=rate=0",
        "--trace-config=count=-1",
        "--trace-config=level=TIMESTAMPS",
        f"--trace-config=opentelemetry,url={otlp_url.rstrip('/')}/v1/traces",
        f"--trace-config=opentelemetry,resource=service.name={service_name}",
    ]
    if export_delay_ms is not None:
        cmd.append(f"--trace-config=opentelemetry,bsp_schedule_delay={export_delay_ms}")
    return cmd


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHM_PREFIX = "moss_triton_"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


class TritonServer:
    """A tritonserver child process.

    >>> with TritonServer("model_repository", http_port=None, grpc_port=None, metrics_port=None) as srv:
    ...     client = tritonclient.grpc.InferenceServerClient(srv.grpc_url)

    A port of None picks a free one. Logs are kept (last `log_lines` lines, see `logs()`) and copied to
    `log_stream` when given. `stop()` sends SIGTERM (Triton finishes in-flight requests), waits `stop_timeout`
    seconds, then kills the process group (the Python backend stubs included).
    """

    def __init__(
        self,
        repo: str | os.PathLike[str],
        *,
        http_port: int | None = DEFAULT_PORTS[0],
        grpc_port: int | None = DEFAULT_PORTS[1],
        metrics_port: int | None = DEFAULT_PORTS[2],
        binary: str | None = None,
        model_control_mode: str | None = None,
        load_models: tuple[str, ...] | list[str] = (),
        histogram_latencies: bool = True,
        log_verbose: int = 0,
        extra_args: tuple[str, ...] | list[str] = (),
        env: dict[str, str] | None = None,
        log_stream: TextIO | None = None,
        log_lines: int = 5000,
        ready_timeout: float = 120.0,
        stop_timeout: float = 30.0,
        host: str = "127.0.0.1",
        trace_otlp_url: str | None = None,
        bind_address: str | None = "127.0.0.1",
        shm_dir: str | os.PathLike[str] = "/dev/shm",
    ) -> None:
        self.repo = Path(repo).resolve()
        self.http_port = http_port if http_port is not None else free_port()
        self.grpc_port = grpc_port if grpc_port is not None else free_port()
        self.metrics_port = metrics_port if metrics_port is not None else free_port()
        self.binary = find_binary(binary)
        self.model_control_mode = model_control_mode
        self.load_models = list(load_models)
        self.histogram_latencies = histogram_latencies
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.log_stream = log_stream
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self.host = host
        self.trace_otlp_url = trace_otlp_url  # OpenTelemetry tracing (trace_args) when set
        # Interfaces tritonserver listens on (HTTP, gRPC, metrics); None = tritonserver's default (all). Local
        # stacks keep loopback; the container passes 0.0.0.0 (`moss-speech triton --bind-address`).
        self.bind_address = bind_address
        self.shm_dir = Path(shm_dir)
        self.proc: subprocess.Popen[str] | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=log_lines)
        self._log_lock = threading.Lock()
        self._reader: threading.Thread | None = None

    # -- addresses ------------------------------------------------------------------------------------------
    @property
    def http_url(self) -> str:
        """host:port, as tritonclient.http expects."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        """host:port, as tritonclient.grpc expects."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def command(self) -> list[str]:
        cmd = [
            str(self.binary.path),
            f"--model-repository={self.repo}",
            *self.binary.args,
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
        ]
        if self.bind_address:
            cmd += [
                f"--http-address={self.bind_address}",
                f"--grpc-address={self.bind_address}",
                f"--metrics-address={self.bind_address}",
            ]
        if not any("shm-region-prefix-name" in a for a in self.extra_args):
            cmd.append(f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}")
        if self.histogram_latencies:
            cmd.append("--metrics-config=histogram_latencies=true")
        if self.model_control_mode:
            cmd.append(f"--model-control-mode={self.model_control_mode}")
        cmd += [f"--load-model={m}" for m in self.load_models]
        if self.log_verbose:
            cmd.append(f"--log-verbose={self.log_verbose}")
        if self.trace_otlp_url:
            cmd += trace_args(self.trace_otlp_url)
        return cmd + self.extra_args

    # -- Python-backend shared memory -------------------------------------------------------------------------
    @property
    def shm_prefix(self) -> str:
        """Our servers' Python-backend region names: `moss_triton_<launcher pid>_<grpc port>_<uuid>`, so a
        crashed server's regions can be told apart from a live one's."""
        return f"{SHM_PREFIX}{os.getpid()}_{self.grpc_port}_"

    def remove_stale_shm(self) -> list[str]:
        """Remove the regions a crashed server left behind (its process group was SIGKILLed, or the container
        restarted while /dev/shm survived): ours (same launcher and port: nothing of ours runs yet) and those of
        launchers that no longer exist. Returns the names removed."""
        removed = []
        try:
            entries = list(self.shm_dir.iterdir())
        except OSError:
            return removed
        for path in entries:
            name = path.name
            if not name.startswith(SHM_PREFIX):
                continue
            pid_text = name[len(SHM_PREFIX) :].split("_", 1)[0]
            stale = name.startswith(self.shm_prefix) or (pid_text.isdigit() and not _alive(int(pid_text)))
            if stale:
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(name)
        return removed

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self, wait: bool = True) -> TritonServer:
        if self.proc is not None:
            raise RuntimeError("already started")
        if stale := self.remove_stale_shm():
            with self._log_lock:
                self._log.append(f"[launcher] removed {len(stale)} stale shared-memory region(s) of a crashed server")
        env = {**os.environ, **self.binary.env, **self.extra_env}
        self.proc = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            bufsize=1,
            env=env,
            start_new_session=True,  # own process group: stop() can reach the backend stubs too
        )
        self._reader = threading.Thread(target=self._pump_logs, name="tritonserver-log", daemon=True)
        self._reader.start()
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise
        return self

    def _pump_logs(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._log_lock:
                self._log.append(line.rstrip("\n"))
            if self.log_stream is not None:
                with contextlib.suppress(ValueError, OSError):  # the stream may be closed at interpreter exit
                    self.log_stream.write(line)
                    self.log_stream.flush()

    def logs(self, last: int | None = None) -> list[str]:
        with self._log_lock:
            lines = list(self._log)
        return lines[-last:] if last else lines

    def is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _metrics_enabled(self) -> bool:
        off = ("--allow-metrics=false", "--allow-metrics=0")
        return not any(a.replace(" ", "=") in off for a in self.extra_args)

    def _metrics_up(self) -> bool:
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll /v2/health/ready; raise TritonStartError (with the last log lines) on exit or timeout."""
        assert self.proc is not None
        deadline = time.monotonic() + (self.ready_timeout if timeout is None else timeout)
        while True:
            code = self.proc.poll()
            if code is not None:
                self._join_reader()
                raise TritonStartError(f"tritonserver exited with code {code} before ready{self._tail()}")
            # HTTP answers "ready" a moment before the metrics service binds: wait for both.
            if self.is_ready() and (not self._metrics_enabled() or self._metrics_up()):
                return
            if time.monotonic() > deadline:
                raise TritonStartError(
                    f"tritonserver not ready after {timeout or self.ready_timeout:.0f} s "
                    f"(http {self.http_url}){self._tail()}"
                )
            time.sleep(0.2)

    def _tail(self, n: int = 40) -> str:
        lines = self.logs(n)
        return "\nlast log lines:\n  " + "\n  ".join(lines) if lines else " (no log output)"

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)

    def send_signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM, wait `timeout` (default stop_timeout), then SIGKILL the group. Returns the exit code."""
        if self.proc is None:
            return 0
        self.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(self.stop_timeout if timeout is None else timeout)
        except subprocess.TimeoutExpired:
            self._kill_group()
            code = self.proc.wait()
        # Stubs normally exit with the server; make sure none outlives it.
        self._kill_group()
        self._join_reader()
        return code

    def _kill_group(self, wait: float = 5.0) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        # SIGKILL is asynchronous: wait until the group is gone so ports/shared memory are free on return.
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.05)

    # -- helpers --------------------------------------------------------------------------------------------
    def metrics(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            return r.read().decode()

    def __enter__(self) -> TritonServer:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
