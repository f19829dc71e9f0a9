"""Every exported codec graph parses and builds in TensorRT with its dynamic profiles (`build_engine`).

On the CPU machines this is TensorRT-RTX building offline (no GPU): it proves the graphs' ops, int64 I/O and
dynamic axes are accepted. Running the engines (TensorRTCodecRuntime) needs a GPU and is not tested here.
"""

import shutil

import pytest

from moss_speech.builders.codec.graphs import GRAPH_IO
from moss_speech.builders.export.onnx_codec import GRAPHS, build_codec_engines, codec_profiles

pytest_plugins = ["tests.export.codec_fixtures"]

tensorrt = pytest.importorskip("moss_speech.builders.export.tensorrt")


@pytest.fixture(scope="module")
def backend():
    try:
        return tensorrt.import_tensorrt()[1]
    except tensorrt.TensorRTUnavailable as e:
        pytest.skip(f"no TensorRT backend: {e}")


@pytest.mark.parametrize("name", GRAPHS)
@pytest.mark.slow
def test_codec_graph_parses_and_builds(codec_tiny_dir, codec_onnx_dir, tmp_path, backend, name):
    # small profiles keep the offline builds fast; the shapes still cover batch 1..2 and whole windows
    profiles = codec_profiles(codec_tiny_dir, max_batch=2, max_prompt_tokens=8)
    assert set(profiles[name]) == set(GRAPH_IO[name][0])
    shutil.copy(codec_onnx_dir / f"{name}.onnx", tmp_path)  # engines land next to the graph
    info = build_codec_engines(codec_tiny_dir, tmp_path, graphs=(name,), max_batch=2, max_prompt_tokens=8)[name]
    assert info.backend == backend and info.bytes > 0 and (tmp_path / f"{name}.engine").stat().st_size == info.bytes
    assert info.strongly_typed and info.profiles[0].keys() == profiles[name].keys()


def test_profiles_cover_a_streaming_window_and_30s(codec_tiny_dir):
    p = codec_profiles(codec_tiny_dir, max_batch=8, max_prompt_tokens=250)
    assert p["whisper_mel"]["pcm"][2] == (8, 480000) and p["speech_encoder"]["mel"][2] == (8, 128, 3000)
    assert p["flow_encoder"]["tokens"][2] == (8, 250 + 28)  # prompt + 20 context + 5 chunk + 3 lookahead
    assert p["flow_estimator"]["x"][0][0] == 2 and p["flow_estimator"]["x"][2] == (16, 80, 4 * 278)  # CFG x2
    assert p["hift"]["noise"][2] == (8, 9, 28 * 1920)
