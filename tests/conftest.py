"""Shared fixtures: tiny checkpoints in the real layouts, the CPU repository and ONE tritonserver serving it, all
built once per test session.

Test tiers: `pytest -m "not slow"` is the unit tier (no tritonserver, no service process, no helm; `./dev.sh unit`),
`pytest` the whole suite. A test is slow when its module says so (`pytestmark = pytest.mark.slow`) or when it uses
a fixture that starts a real process (SLOW_FIXTURES): new tests on the shared server land in the right tier.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/, for tritonharness (one module object)

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

# Fixtures that start tritonserver, the service or helm (here and in the suites' conftest.py files).
SLOW_FIXTURES = {"served", "triton", "service", "stub", "triton_server", "helm"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny MOSS-Speech checkpoint directory (LLM only), seed 0."""
    from moss_speech.builders.llm.checkpoint import write_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny-llm")
    write_tiny_checkpoint(path, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from moss_speech.builders.llm.model import MossSpeechForCausalLM

    return MossSpeechForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def prompt_builder(tiny_dir, tiny_model):
    from moss_speech.builders.llm.prompt import PromptBuilder

    return PromptBuilder.from_dir(tiny_dir, tiny_model.config)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """`moss-speech checkpoint tiny` output: the LLM checkpoint, with the codec in ./codec."""
    from moss_speech.builders.tiny import write_tiny_bundle

    path = tmp_path_factory.mktemp("tiny-bundle")
    write_tiny_bundle(path, seed=0)
    return path


@pytest.fixture(scope="session")
def cpu_repo(tiny_bundle, tmp_path_factory):
    """The CPU model repository (onnxruntime LLM and codec) built from `tiny_bundle`, with a small context
    so context errors are cheap to provoke."""
    from moss_speech.builders.export.build import build_repository
    from moss_speech.contract.serving import ServingConfig

    out = tmp_path_factory.mktemp("cpu-repo")
    # MOSS_SPEECH_TEST_LLM=torch serves the llm with the torch runtime; torch-cuda does so on a GPU (KIND_GPU: what
    # bench/gpu_serving.sh runs on a GPU machine). The codec stays onnxruntime on the CPU either way.
    llm = {"torch": {"llm_runtime": "torch"}, "torch-cuda": {"llm_runtime": "torch", "kind": "KIND_GPU"}}
    choice = llm.get(os.environ.get("MOSS_SPEECH_TEST_LLM", ""), {})
    serving = ServingConfig.for_target("cpu", max_slots=4, max_context=1024, **choice)
    build_repository(tiny_bundle, tiny_bundle / "codec", "cpu", out, serving, progress=False)
    return out


@pytest.fixture(scope="session")
def served(cpu_repo):
    """One real tritonserver serving `cpu_repo` for the whole session (tests/serving, tests/service, ...).

    Tests must leave it as they found it (no stop, no restart); a test that stops or kills a server starts its
    own (`triton_server` in tests/tritonharness.py, or `TritonServer(cpu_repo, ...)`).
    """
    from tritonharness import tritonserver_available

    from moss_speech.model_repository.launcher import TritonServer

    if not tritonserver_available():
        pytest.skip("no tritonserver (install the triton-local extra or run inside NVIDIA's container)")
    srv = TritonServer(cpu_repo, http_port=None, grpc_port=None, metrics_port=None, ready_timeout=300, stop_timeout=20)
    srv.start()
    yield srv
    code = srv.stop()
    print(f"--- shared tritonserver stopped with exit code {code}; last log lines ---")
    print("\n".join(srv.logs(40)))


@pytest.fixture(scope="session")
def tiny_small_dir(tmp_path_factory):
    """A tiny checkpoint with a 288-token text vocabulary (special tokens from id 256; LLM only), seed 0."""
    from moss_speech.builders.llm.checkpoint import write_tiny_checkpoint

    path = tmp_path_factory.mktemp("tiny-small-llm")
    write_tiny_checkpoint(path, seed=0, small_vocab=True)
    return path


@pytest.fixture(scope="session")
def tiny_small_bundle(tmp_path_factory):
    """`moss-speech checkpoint tiny --small-vocab` output: the small-vocabulary LLM, with the codec in ./codec."""
    from moss_speech.builders.tiny import write_tiny_bundle

    path = tmp_path_factory.mktemp("tiny-small-bundle")
    write_tiny_bundle(path, seed=0, small_vocab=True)
    return path
