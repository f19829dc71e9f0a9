"""Fixtures for the service tests: the session's REAL tritonserver (`served`, tests/conftest.py, serving the tiny
repository `cpu_repo`) and the service as a `moss-speech serve` subprocess pointed at it (session-scoped).
Tests that stop Triton start their own (`own_triton`)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # .../tests, for tritonharness
sys.path.insert(0, str(Path(__file__).resolve().parent))  # .../tests/service, for service_support
from service_support import ServiceProcess, start_triton  # noqa: E402
from tritonharness import tritonserver_available  # noqa: E402

from moss_speech.model_repository.launcher import TritonServer  # noqa: E402


@pytest.fixture(scope="session")
def triton(served) -> TritonServer:
    """The session's shared tritonserver: never stop it here (see `own_triton`)."""
    return served


@pytest.fixture
def own_triton(cpu_repo) -> Iterator[list[TritonServer]]:
    """A tritonserver of the test's own on `cpu_repo`, for tests that stop or restart it: a list whose last item
    is the current server (append what `restart_triton` returns); all are stopped at teardown."""
    if not tritonserver_available():
        pytest.skip("no tritonserver (install the triton-local extra or run inside NVIDIA's container)")
    servers = [start_triton(cpu_repo)]
    yield servers
    for srv in servers:
        srv.stop()


@pytest.fixture(scope="session")
def service(triton, tmp_path_factory) -> Iterator[ServiceProcess]:
    svc = ServiceProcess(triton.grpc_url, tmp_path_factory.mktemp("service") / "service.log").start()
    yield svc
    svc.stop()
    print("--- service log (last 40 lines) ---")
    print("\n".join(svc.logs().splitlines()[-40:]))


@pytest.fixture(scope="session")
def stub(service):
    from moss_speech.services.api import speech_pb2_grpc

    channel = grpc.insecure_channel(service.address)
    yield speech_pb2_grpc.MossSpeechStub(channel)
    channel.close()
