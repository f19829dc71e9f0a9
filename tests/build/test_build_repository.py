"""`moss-speech build`: idempotent by content hash, manifest, config profiles, CLI, and clear errors."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest

from moss_speech.builders.export.build import BuildError, build_repository
from moss_speech.contract.serving import ServingConfig

TORCH_ONLY = ServingConfig.for_target("cpu", llm_runtime="torch", codec_backend="torch")


def test_cpu_build_is_idempotent_and_rebuilds_only_what_changed(tiny_bundle, cpu_repo, tmp_path):
    manifest = json.loads((cpu_repo / "manifest.json").read_text())
    assert set(manifest["artifacts"]) == {"llm.onnx", "llm", "codec.onnx", "codec.voices", "codec"}
    assert manifest["serving"]["llm_runtime"] == "onnxruntime" and manifest["serving"]["kind"] == "KIND_CPU"
    for name in ("torch", "onnx", "onnxruntime"):
        assert manifest["tools"][name]
    assert len(manifest["sources"]["checkpoint"]["sha256"]) == 64
    llm = manifest["artifacts"]["llm.onnx"]
    assert llm["bytes"] > 0 and llm["graph"]["inputs"] and [f["root"] for f in llm["files"]] == ["cache"]
    served = manifest["artifacts"]["llm"]["files"]
    assert [(f["root"], f["path"]) for f in served] == [("repository", "llm/1/artifacts/model.onnx")]
    assert served[0]["sha256"] == llm["files"][0]["sha256"] and (cpu_repo / served[0]["path"]).is_file()

    # The same inputs again: nothing is rebuilt.
    serving = ServingConfig.model_validate(manifest["serving"])
    again = build_repository(tiny_bundle, tiny_bundle / "codec", "cpu", cpu_repo, serving, progress=False)
    assert all(a["skipped"] for a in again["artifacts"].values())

    # A changed checkpoint file rebuilds the LLM graph, not the codec graphs.
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_bundle, ckpt)
    repo = tmp_path / "repo"
    shutil.copytree(cpu_repo, repo)
    shutil.copytree(cpu_repo.with_name(cpu_repo.name + ".build-cache"), repo.with_name("repo.build-cache"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (ckpt / "config.json").write_text(json.dumps(cfg))
    changed = build_repository(ckpt, ckpt / "codec", "cpu", repo, serving, progress=False)
    assert changed["artifacts"]["llm.onnx"]["skipped"] is False
    assert changed["artifacts"]["codec.onnx"]["skipped"] is True


def test_repository_configs(cpu_repo):
    llm = (cpu_repo / "llm" / "config.pbtxt").read_text()
    assert "decoupled: true" in llm and "KIND_CPU" in llm and "max_batch_size: 4" in llm
    assert '\\"max_context\\":1024' in llm
    for name in ("speech_encoder", "vocoder"):
        text = (cpu_repo / name / "config.pbtxt").read_text()
        assert "dynamic_batching" in text and "allow_ragged_batch: true" in text
        assert "{model}/1/artifacts/codec" in text  # each codec model reads its own folder
    assert (cpu_repo / "vocoder/1/artifacts/codec/hift.onnx").is_file()
    assert not (cpu_repo / "speech_encoder/1/artifacts/codec/hift.onnx").exists()  # its graphs only
    vocoder = (cpu_repo / "vocoder" / "config.pbtxt").read_text()
    assert 'key: "voices"\n  value { string_value: "default" }' in vocoder  # what ListVoices serves
    s2s = (cpu_repo / "s2s" / "config.pbtxt").read_text()
    assert 'platform: "ensemble"' in s2s and "max_inflight_requests" not in s2s  # 2.51 rejects the field
    for name in ("speech_encoder", "llm", "vocoder"):
        shim = (cpu_repo / name / "1" / "model.py").read_text()
        assert f"from moss_speech.model_repository.adapters.{name} import TritonPythonModel" in shim


def test_newer_triton_options_and_gpu_profile(tiny_bundle, tmp_path):
    from moss_speech.model_repository.writer import write_repository

    serving = ServingConfig.for_target("gpu", max_inflight_requests=16)
    write_repository(
        tmp_path, serving, tiny_bundle, tiny_bundle / "codec", "llm/1/artifacts/model.plan", "vocoder/1/artifacts/codec"
    )
    assert "max_inflight_requests: 16" in (tmp_path / "s2s" / "config.pbtxt").read_text()
    llm = (tmp_path / "llm" / "config.pbtxt").read_text()
    assert "KIND_GPU" in llm and '\\"llm_runtime\\":\\"tensorrt\\"' in llm and "model.plan" in llm


def test_context_beyond_the_model_is_refused(tiny_bundle, tmp_path):
    with pytest.raises(BuildError, match="max_context 100000 exceeds the model's context .*2048"):
        build_repository(
            tiny_bundle,
            tiny_bundle / "codec",
            "cpu",
            tmp_path,
            ServingConfig.for_target("cpu", max_context=100000),
            progress=False,
        )


def test_cli_build_with_torch_runtimes(tiny_bundle, tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "moss_speech.cli.main",
            "build",
            "--checkpoint",
            str(tiny_bundle),
            "--codec",
            str(tiny_bundle / "codec"),
            "--out",
            str(tmp_path),
            "--llm-runtime",
            "torch",
            "--codec-backend",
            "torch",
            "--cache-dir",
            str(tmp_path / "elsewhere"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout)["artifacts"] == {}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["cache_dir"] == str((tmp_path / "elsewhere").resolve()) and (tmp_path / "elsewhere").is_dir()
    assert (tmp_path / "t2s" / "config.pbtxt").is_file()
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "moss_speech.cli.main",
            "build",
            "--checkpoint",
            str(tmp_path),
            "--codec",
            str(tiny_bundle / "codec"),
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "error: no config.json" in bad.stderr and "Traceback" not in bad.stderr


def test_gpu_target_builds_engines_offline(tiny_bundle, tmp_path, capsys):
    """Without a GPU the engines come from the TensorRT-RTX builder: they prove every graph parses and builds
    with the config's profiles. Running them needs a GPU and is not checked here."""
    pytest.importorskip("tensorrt_rtx_bindings" if importlib.util.find_spec("tensorrt") is None else "tensorrt")
    manifest = build_repository(
        tiny_bundle,
        tiny_bundle / "codec",
        "gpu",
        tmp_path,
        ServingConfig.for_target("gpu", max_slots=2, max_context=256),
        progress=False,
    )
    llm = manifest["artifacts"]["llm"]["engine"]
    assert llm["precision"] == "bf16" and (tmp_path / "llm/1/artifacts/model.plan").stat().st_size > 0
    assert [p["past_kv"][2][2] for p in manifest["artifacts"]["llm"]["profiles"]] == [2, 1]  # max batch
    # The repository holds what Triton loads; the graphs stay in the build cache.
    assert not list(tmp_path.rglob("*.onnx")) and (tmp_path.with_name(tmp_path.name + ".build-cache") / "llm").is_dir()
    assert (tmp_path / "speech_encoder/1/artifacts/codec/speech_encoder.engine").is_file()
    engines = manifest["artifacts"]["codec.engines"]["engines"]
    assert set(engines) == {"whisper_mel", "speech_encoder", "flow_encoder", "flow_estimator", "hift"}
    text = (tmp_path / "llm" / "config.pbtxt").read_text()
    assert "KIND_GPU" in text and "model.plan" in text
    if llm["backend"] == "tensorrt-rtx":
        assert "TensorRT-RTX" in capsys.readouterr().err
