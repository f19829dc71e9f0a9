"""The launcher's GPU startup check, on this machine (no CUDA device): a GPU repository fails with a message naming
the cause, a CPU repository passes, and `moss-speech triton` exits before starting tritonserver."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from moss_speech.contract.serving import ServingConfig
from moss_speech.model_repository.runtime import gpu_check


def write_manifest(repo, target: str, **tools) -> None:
    repo.mkdir(parents=True, exist_ok=True)
    serving = ServingConfig.for_target(target).model_dump()
    (repo / "manifest.json").write_text(
        json.dumps({"target": target, "serving": serving, "tools": tools, "artifacts": {}})
    )


@pytest.fixture(autouse=True)
def no_gpu_here():
    if gpu_check.cuda_device_count() > 0:
        pytest.skip("a CUDA device is visible: this test checks the no-GPU answer")


def test_gpu_repository_fails_with_a_clear_message(tmp_path) -> None:
    write_manifest(tmp_path / "repo", "gpu", tensorrt="10.7.0")
    with pytest.raises(gpu_check.GpuCheckError, match="KIND_GPU.*no CUDA device is visible"):
        gpu_check.check_repository(tmp_path / "repo")


def test_cpu_repository_passes_without_gpu_libraries(tmp_path) -> None:
    write_manifest(tmp_path / "repo", "cpu")
    assert gpu_check.check_repository(tmp_path / "repo") == []
    assert "tensorrt" not in sys.modules


def test_repository_without_manifest_uses_the_config_kinds(tmp_path) -> None:
    (tmp_path / "cpu" / "m").mkdir(parents=True)
    (tmp_path / "cpu" / "m" / "config.pbtxt").write_text("instance_group [ { count: 1, kind: KIND_CPU } ]")
    assert gpu_check.check_repository(tmp_path / "cpu") == []
    (tmp_path / "gpu" / "m").mkdir(parents=True)
    (tmp_path / "gpu" / "m" / "config.pbtxt").write_text("instance_group [ { count: 1, kind: KIND_GPU } ]")
    with pytest.raises(gpu_check.GpuCheckError, match="no CUDA device"):
        gpu_check.check_repository(tmp_path / "gpu")


def test_runtime_checks_name_the_fix(tmp_path) -> None:
    """Past the device check: engines from another TensorRT, or TensorRT-RTX engines, are refused by name."""
    cfg = {"tools": {"tensorrt": "0.0.1"}, "artifacts": {"llm": {"backend": "tensorrt-rtx"}}}
    with pytest.raises(gpu_check.GpuCheckError, match="TensorRT-RTX.*rebuild"):
        gpu_check.check_tensorrt(cfg)
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001
        with pytest.raises(gpu_check.GpuCheckError, match="need TensorRT, but `import tensorrt` fails"):
            gpu_check.check_tensorrt({"tools": {}, "artifacts": {}})


def test_launcher_exits_before_tritonserver_on_a_gpu_repository(tmp_path) -> None:
    write_manifest(tmp_path / "repo", "gpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "moss_speech.cli.main",
            "triton",
            "--repo",
            str(tmp_path / "repo"),
            "--server-binary",
            "/nonexistent/tritonserver",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stderr
    assert "GPU check failed" in proc.stderr and "no CUDA device is visible" in proc.stderr
    assert "Traceback" not in proc.stderr
