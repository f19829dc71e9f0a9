"""Fixtures for the realtime tests: the session's REAL tritonserver (`served`), the REAL gRPC service and the REAL
gateway as `moss-speech serve` / `moss-speech realtime` subprocesses, and spoken questions from espeak-ng."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from tritonharness import stop_process

from moss_speech.model_repository.launcher import free_port

SERVICE_ENV = {
    "MOSS_SPEECH_MAX_NEW_TOKENS": "25",  # 2 s answers keep the CPU tests short
    "MOSS_SPEECH_MAX_AUDIO_SECONDS": "20",
    "MOSS_SPEECH_HEALTH_CHECK_SECONDS": "0.3",
    "MOSS_SPEECH_LOG_FORMAT": "json",
    "MOSS_SPEECH_PLAINTEXT": "true",
    "MOSS_SPEECH_AUTH": "none",  # local test stack: explicitly open
}


class Proc:
    """A `moss-speech` subcommand in a subprocess, its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moss_speech.cli.main", *args],
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"process exited {self.proc.returncode}:\n{self.logs()[-3000:]}")

    def stop(self) -> None:
        stop_process(self.proc, 30)
        self._log.close()


def start_service(triton_url: str, log_dir: Path, **env: str) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc(
        ["serve"],
        {
            **SERVICE_ENV,
            **env,
            "MOSS_SPEECH_TRITON_URL": triton_url,
            "MOSS_SPEECH_GRPC_PORT": str(port),
            "MOSS_SPEECH_METRICS_PORT": str(free_port()),
        },
        log_dir / "service.log",
    )
    return proc, port


def start_gateway(service_port: int, log_dir: Path, **env: str) -> tuple[Proc, int]:
    port = free_port()
    proc = Proc(
        ["realtime"],
        {
            "MOSS_REALTIME_SERVICE_URL": f"127.0.0.1:{service_port}",
            "MOSS_REALTIME_HOST": "127.0.0.1",
            "MOSS_REALTIME_PORT": str(port),
            "MOSS_REALTIME_LOG_FORMAT": "json",
            **env,
        },
        log_dir / "gateway.log",
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        proc.check_alive()
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2).status == 200:
                return proc, port
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"gateway never ready:\n{proc.logs()[-3000:]}")


class Stack:
    def __init__(self, service: Proc, service_port: int, gateway: Proc, port: int) -> None:
        self.service, self.service_port, self.gateway, self.port = service, service_port, gateway, port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime?model=moss-speech"

    def metrics(self) -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5).read().decode()


@pytest.fixture(scope="session")
def realtime_stack(request, tmp_path_factory) -> Iterator[Stack]:
    """The service and the gateway, on the session's tritonserver (`served`), or on the one at
    MOSS_TEST_TRITON_URL (a `moss-speech up` or `moss-speech triton` already running: quicker to iterate)."""
    triton_url = os.environ.get("MOSS_TEST_TRITON_URL") or request.getfixturevalue("served").grpc_url
    logs = tmp_path_factory.mktemp("realtime-stack")
    service, sport = start_service(triton_url, logs)
    try:
        gateway, gport = start_gateway(sport, logs, MOSS_REALTIME_MAX_CONNECTIONS="12")
    except Exception:
        service.stop()
        raise
    yield Stack(service, sport, gateway, gport)
    gateway.stop()
    service.stop()
    print("--- gateway log (last 30 lines) ---\n" + "\n".join(gateway.logs().splitlines()[-30:]))


def speak(text: str, rate: int = 24000) -> np.ndarray:
    """int16 mono speech of `text` from espeak-ng, resampled to `rate` by sox."""
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        pytest.skip("needs espeak-ng and sox")
    wav = subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "150", "--stdout", text], check=True, capture_output=True
    ).stdout
    raw = subprocess.run(
        [
            "sox",
            "-t",
            "wav",
            "-",
            "-t",
            "raw",
            "-r",
            str(rate),
            "-c",
            "1",
            "-b",
            "16",
            "-e",
            "signed-integer",
            "-L",
            "-",
        ],
        input=wav,
        check=True,
        capture_output=True,
    ).stdout
    return np.frombuffer(raw, dtype="<i2").copy()


@pytest.fixture(scope="session")
def question() -> np.ndarray:
    return speak("What is the tallest mountain in the world?")
