"""Sampling is defined once (moss_speech.contract.sampling); every other place derives from it."""

import json

import pytest
from pydantic import ValidationError

from moss_speech.contract.sampling import FIELDS, SamplingParams


def test_defaults_are_the_reference_demo():
    p = SamplingParams()
    assert (
        p.do_sample,
        p.temperature,
        p.top_p,
        p.top_k,
        p.repetition_penalty,
        p.max_new_tokens,
        p.min_new_tokens,
        p.seed,
    ) == (True, 0.6, 0.95, 20, 1.1, 500, 0, None)
    assert {name: getattr(p, name) for name in FIELDS} == {name: d for name, (d, _, _) in FIELDS.items()}


def test_sampling_json_round_trip_and_missing_fields():
    p = SamplingParams(temperature=0.7, top_k=5, seed=11, max_new_tokens=9)
    assert SamplingParams.from_json(p.to_json()) == p
    assert "seed" not in json.loads(SamplingParams().to_json())  # unset seed stays unset (random)
    assert SamplingParams.from_json(None) == SamplingParams.from_json("") == SamplingParams()


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"seed": -1}, "seed"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"nucleus": 0.9}, "nucleus"),
    ],
)
def test_limits_name_the_field(bad, field):
    with pytest.raises(ValidationError) as e:
        SamplingParams.from_json(json.dumps(bad))
    assert field in str(e.value)


def test_temperature_zero_means_greedy():
    assert SamplingParams(temperature=0).do_sample is False
    assert SamplingParams(temperature=0, do_sample=False).do_sample is False
    with pytest.raises(ValidationError, match="temperature 0 means greedy"):
        SamplingParams(temperature=0, do_sample=True)


def test_proto_sampling_has_exactly_the_contract_fields():
    from moss_speech.services.api import speech_pb2

    assert [f.name for f in speech_pb2.Sampling.DESCRIPTOR.fields] == list(FIELDS)


def test_service_proto_conversion_overrides_only_set_fields():
    from moss_speech.services.api import speech_pb2
    from moss_speech.services.server import sampling_from_proto
    from moss_speech.services.settings import ServiceSettings

    settings = ServiceSettings(max_new_tokens=8)
    p = sampling_from_proto(speech_pb2.Sampling(top_k=3, seed=5), settings.sampling_defaults())
    assert (p.top_k, p.seed, p.max_new_tokens, p.temperature) == (3, 5, 8, settings.temperature)
    greedy = sampling_from_proto(speech_pb2.Sampling(temperature=0), settings.sampling_defaults())
    assert greedy.do_sample is False


def test_settings_and_cli_take_defaults_and_limits_from_the_contract():
    import argparse

    from moss_speech.cli.model import CLI_DEFAULTS, add_sampling_flags
    from moss_speech.services.settings import SAMPLING_DEFAULTS, ServiceSettings

    schema = ServiceSettings.model_json_schema()["properties"]
    contract = SamplingParams.model_json_schema()["properties"]
    for name in SAMPLING_DEFAULTS:
        assert ServiceSettings.model_fields[name].default == FIELDS[name][0]
        limits = {k: v for k, v in contract[name].items() if k in ("minimum", "maximum", "exclusiveMinimum")}
        assert {k: schema[name].get(k) for k in limits} == limits, name
    parser = argparse.ArgumentParser()
    add_sampling_flags(parser)
    args = vars(parser.parse_args([]))
    assert args == {name: CLI_DEFAULTS.get(name, d) for name, (d, _, _) in FIELDS.items() if name != "do_sample"}
