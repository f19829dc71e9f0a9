"""Where a Triton model instance runs the torch runtime: the GPU Triton assigned to a KIND_GPU instance."""

from __future__ import annotations

from moss_speech.model_repository.adapters.common import instance_device


def test_instance_device_follows_the_instance_kind():
    assert instance_device({"model_instance_kind": "GPU", "model_instance_device_id": "1"}) == "cuda:1"
    assert instance_device({"model_instance_kind": "GPU"}) == "cuda:0"
    assert instance_device({"model_instance_kind": "CPU", "model_instance_device_id": "0"}) == "cpu"
    assert instance_device({}) == "cpu"
