"""The written config.pbtxt files are the contract's tensor specs, and the ensembles wire them consistently."""

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from moss_speech.contract import tensors as T
from moss_speech.contract.serving import ServingConfig
from moss_speech.model_repository.writer import write_repository

MODELS = {m.name: m for m in (*T.PYTHON_MODELS, *T.ENSEMBLES)}


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    out = tmp_path_factory.mktemp("repo")
    write_repository(out, ServingConfig.for_target("cpu", max_audio_seconds=12.5), out / "ckpt", out / "codec")
    return {
        name: text_format.Parse((out / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        for name in MODELS
    }


def _io(tensors) -> list[tuple]:
    # ModelOutput has neither `optional` nor `allow_ragged_batch`
    return [
        (
            t.name,
            model_config_pb2.DataType.Name(t.data_type),
            tuple(t.dims),
            getattr(t, "optional", False),
            getattr(t, "allow_ragged_batch", False),
        )
        for t in tensors
    ]


def _spec(tensors) -> list[tuple]:
    return [(t.name, t.triton_type, t.dims, t.optional, t.ragged) for t in tensors]


@pytest.mark.parametrize("name", list(MODELS))
def test_config_tensors_are_the_contract(configs, name):
    config, spec = configs[name], MODELS[name]
    assert config.name == spec.name
    assert _io(config.input) == _spec(spec.inputs)
    assert _io(config.output) == _spec(spec.outputs)


@pytest.mark.parametrize("name", [m.name for m in T.ENSEMBLES])
def test_ensemble_wiring(configs, name):
    config, spec = configs[name], MODELS[name]
    available = {t.name for t in spec.inputs}
    for step in config.ensemble_scheduling.step:
        model = MODELS[step.model_name]
        assert set(step.input_map) <= {t.name for t in model.inputs}
        assert {t.name for t in model.inputs if not t.optional} <= set(step.input_map), step.model_name
        assert set(step.input_map.values()) <= available, f"{step.model_name} reads a tensor nobody wrote"
        assert set(step.output_map) <= {t.name for t in model.outputs}
        available |= set(step.output_map.values())
    assert {t.name for t in spec.outputs} <= available


def test_llm_outputs_feed_every_vocoder_input():
    assert [t.name for t in T.VOCODER.inputs] == [t.name for t in T.LLM.outputs]
    assert [t.dims for t in T.VOCODER.inputs] == [t.dims for t in T.LLM.outputs]


def test_max_audio_seconds_travels_in_the_serving_config(configs):
    serving = ServingConfig.model_validate_json(configs["speech_encoder"].parameters["serving"].string_value)
    assert serving.max_audio_seconds == 12.5
