"""Shared fixtures: tiny checkpoints in the real layouts, built once per test session."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


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
    from moss_speech.builders.config import ServingConfig
    from moss_speech.builders.export.build import build_repository

    out = tmp_path_factory.mktemp("cpu-repo")
    build_repository(tiny_bundle, tiny_bundle / "codec", "cpu", out,
                     ServingConfig.for_target("cpu", max_slots=4, max_context=1024), progress=False)
    return out


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
