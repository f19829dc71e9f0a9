"""Artifacts are verified, not trusted: the manifest lists every file with size and hash, a build rebuilds what is
missing, truncated or changed, the adapters refuse a mismatch; and the real-width benchmark's ratio logic."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from moss_speech.builders.export.build import build_repository, default_cache_dir
from moss_speech.contract.serving import ServingConfig
from moss_speech.model_repository.adapters.common import artifact_path, verify_model_files

SERVING = ServingConfig.for_target("cpu", max_slots=4, max_context=1024)  # what the cpu_repo fixture was built with


@pytest.fixture
def repo_copy(cpu_repo, tmp_path) -> Path:
    """A private copy of the session repository and its build cache (copies, so hard links are not shared)."""
    repo = tmp_path / "repo"
    shutil.copytree(cpu_repo, repo)
    shutil.copytree(default_cache_dir(cpu_repo), default_cache_dir(repo))
    return repo


def rebuild(tiny_bundle, repo) -> dict:
    manifest = build_repository(tiny_bundle, tiny_bundle / "codec", "cpu", repo, SERVING, progress=False)
    return {k: v.get("rebuilt_because") for k, v in manifest["artifacts"].items() if not v["skipped"]}


def test_manifest_lists_every_file_with_size_and_hash(cpu_repo):
    manifest = json.loads((cpu_repo / "manifest.json").read_text())
    files = {(f["root"], f["path"]): f for a in manifest["artifacts"].values() for f in a["files"]}
    assert ("repository", "llm/1/artifacts/model.onnx") in files
    # each codec model reads its own folder, which holds only the graphs it runs
    served = {path for root, path in files if root == "repository"}
    for model, graphs in {
        "speech_encoder": ["whisper_mel", "speech_encoder"],
        "vocoder": ["flow_encoder", "flow_estimator", "hift"],
    }.items():
        own = sorted(
            Path(p).name for p in served if p.startswith(f"{model}/1/artifacts/codec/") and p.endswith(".onnx")
        )
        assert own == sorted(f"{g}.onnx" for g in graphs), model
    assert "vocoder/1/artifacts/codec/voices/default.npz" in served  # built-in voices come precomputed
    assert "vocoder/1/artifacts/codec/speaker.npz" in served
    assert not any(p.startswith("speech_encoder/") and p.endswith(".npz") for p in served)
    roots = {"repository": cpu_repo, "cache": Path(manifest["cache_dir"])}
    for (root, path), f in files.items():
        assert (roots[root] / path).stat().st_size == f["bytes"] and len(f["sha256"]) == 64


def test_truncated_or_missing_outputs_are_rebuilt(tiny_bundle, repo_copy):
    cache = default_cache_dir(repo_copy)
    for path in (repo_copy / "llm/1/artifacts/model.onnx", cache / "llm/model-float32.onnx"):
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    (cache / "codec" / "hift.onnx").unlink()  # an intermediate no served artifact needs now
    why = rebuild(tiny_bundle, repo_copy)
    assert set(why) == {"llm.onnx", "llm"}
    assert why["llm.onnx"].startswith("llm/model-float32.onnx has") and "the manifest says" in why["llm.onnx"]
    verify_model_files(repo_copy, "llm")
    assert rebuild(tiny_bundle, repo_copy) == {}  # up to date now
    (repo_copy / "vocoder/1/artifacts/codec/hift.onnx").unlink()  # now the served codec needs the export again
    why = rebuild(tiny_bundle, repo_copy)
    assert why == {
        "codec.onnx": "codec/hift.onnx is missing",
        "codec": "vocoder/1/artifacts/codec/hift.onnx is missing",
    }


def test_changed_served_file_is_reinstalled_without_reexport(tiny_bundle, repo_copy):
    hift = repo_copy / "vocoder/1/artifacts/codec/hift.onnx"
    hift.unlink()  # the served link only: the cached graph is intact
    hift.write_bytes(b"not a graph")
    assert rebuild(tiny_bundle, repo_copy) == {
        "codec": "vocoder/1/artifacts/codec/hift.onnx has 11 bytes, the "
        f"manifest says {_bytes(repo_copy, 'codec.onnx', 'hift.onnx')}"
    }


def _bytes(repo: Path, artifact: str, name: str) -> int:
    manifest = json.loads((repo / "manifest.json").read_text())
    return next(f["bytes"] for f in manifest["artifacts"][artifact]["files"] if f["path"].endswith(name))


def test_adapters_refuse_a_repository_that_does_not_match(repo_copy):
    args = {"model_repository": str(repo_copy / "vocoder")}
    params = {"codec_artifacts": "{model}/1/artifacts/codec"}
    assert artifact_path(args, params, "codec_artifacts") == repo_copy / "vocoder/1/artifacts/codec"
    flow = repo_copy / "vocoder/1/artifacts/codec/flow_encoder.onnx"
    data = bytearray(flow.read_bytes())
    data[-1] ^= 1  # same size, one bit changed
    flow.unlink()
    flow.write_bytes(bytes(data))
    with pytest.raises(
        ValueError,
        match=r"model vocoder: artifact vocoder/1/artifacts/codec/flow_encoder.onnx "
        r"differs from the manifest \(sha256\)",
    ) as e:
        artifact_path(args, params, "codec_artifacts")
    assert str(repo_copy) not in str(e.value)  # names the file inside the repository, nothing else
    flow.unlink()
    with pytest.raises(ValueError, match="flow_encoder.onnx is missing"):
        verify_model_files(repo_copy, "vocoder")
    verify_model_files(repo_copy, "speech_encoder")  # its own folder is intact
    (repo_copy / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no manifest.json"):
        verify_model_files(repo_copy, "llm")


def _bench():
    path = Path(__file__).resolve().parents[2] / "bench" / "realwidth_bench.py"
    spec = importlib.util.spec_from_file_location("realwidth_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_realwidth_bench_ratio_logic():
    bench = _bench()
    real = bench.param_count(4096, 12288, 32, 8, 128, 151680, 16512, 32, 4)
    assert 9.0e9 < real < 9.2e9  # the real model: 9.1 B
    assert 1.95e9 < bench.param_count(4096, 12288, 32, 8, 128, 151680, 16512, 1, 1) < 1.97e9  # 1+1+1: 1.96 B
    whole, marginal = bench.ratio(peak_bytes=13 * 2**30, base_bytes=2**30, weight_bytes=10 * 2**30)
    assert whole == pytest.approx(1.3) and marginal == pytest.approx(1.2)
    assert bench.project(2**30, 1.2, 100 * 2**30) == pytest.approx(121.0)
    assert bench.ratio(5, 10, 100) == (0.05, 0.0)  # a peak under the base adds nothing


def test_each_codec_model_loads_only_its_graphs_and_serves_what_the_whole_codec_does(tiny_bundle, cpu_repo):
    """The speech encoder's folder encodes, the vocoder's decodes (its built-in voice from the build's
    precomputed conditioning): both exactly as a runtime over every graph; a call into an absent graph is a
    clear error."""
    import numpy as np

    from moss_speech.builders.codec.streaming import DecodeWindow
    from moss_speech.builders.export.build import codec_graphs_dir
    from moss_speech.model_repository.runtime.codec_runtime import AbsentGraph, CodecRuntime

    whole = CodecRuntime.from_artifacts(tiny_bundle / "codec", codec_graphs_dir(cpu_repo), threads=1)
    enc = CodecRuntime.from_artifacts(tiny_bundle / "codec", cpu_repo / "speech_encoder/1/artifacts/codec", threads=1)
    voc = CodecRuntime.from_artifacts(tiny_bundle / "codec", cpu_repo / "vocoder/1/artifacts/codec", threads=1)
    assert {k for k, g in enc.graphs.items() if not isinstance(g, AbsentGraph)} == {"whisper_mel", "speech_encoder"}
    assert {k for k, g in voc.graphs.items() if not isinstance(g, AbsentGraph)} == {
        "flow_encoder",
        "flow_estimator",
        "hift",
    }
    pcm = np.sin(np.arange(24000) * 0.05).astype(np.float32)
    codes = whole.encode_pcm([pcm])[0]
    np.testing.assert_array_equal(enc.encode_pcm([pcm])[0], codes)
    with pytest.raises(RuntimeError, match="'whisper_mel' is not served from"):
        voc.encode_pcm([pcm])

    computed = whole.make_voice("default", whole.voices.builtin_files["default"])
    served = voc.voices.get("default")  # from voices/default.npz: the vocoder has no encoder to compute it
    for k in ("prompt_codes", "prompt_mel", "xvector"):
        np.testing.assert_array_equal(getattr(served, k), getattr(computed, k))
    window = DecodeWindow(
        tokens=[int(c) for c in codes[:6]], n_context=0, n_chunk=4, first_position=0, voice_id="default"
    )
    np.testing.assert_array_equal(voc.decode_windows([window])[0], whole.decode_windows([window])[0])
