"""ServiceSettings: env parsing, validation, and its generated artifacts (chart schema, docs table)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml
from helm_support import CHART, REPO
from pydantic import ValidationError

from moss_speech.services import settings as s

# Fields the chart derives instead of copying a default (triton_url points at the release's Triton Service).
CHART_DERIVED = {"triton_url", "sessions_backend", "redis_url"}  # sessions.backend; redis_url from a Secret


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for key in list(os.environ):
        if key.upper().startswith(s.ENV_PREFIX):
            monkeypatch.delenv(key)
    return monkeypatch


def test_contract_defaults(clean_env) -> None:
    cfg = s.ServiceSettings()
    assert (cfg.triton_url, cfg.grpc_port, cfg.metrics_port) == ("localhost:8001", 50051, 9090)
    assert (cfg.temperature, cfg.top_p, cfg.top_k, cfg.repetition_penalty) == (0.6, 0.95, 20, 1.1)
    assert (cfg.max_new_tokens, cfg.min_new_tokens) == (500, 0)
    assert (cfg.s2s_model, cfg.t2s_model, cfg.log_format) == ("s2s", "t2s", "json")


def test_env_overrides_with_prefix(clean_env) -> None:
    clean_env.setenv("MOSS_SPEECH_TEMPERATURE", "0.9")
    clean_env.setenv("moss_speech_max_sessions", "7")
    clean_env.setenv("TEMPERATURE", "0.1")  # no prefix: ignored
    cfg = s.ServiceSettings()
    assert cfg.temperature == 0.9 and cfg.max_sessions == 7


@pytest.mark.parametrize(
    "env",
    [
        {"MOSS_SPEECH_TOP_P": "1.5"},
        {"MOSS_SPEECH_GRPC_PORT": "0"},
        {"MOSS_SPEECH_LOG_LEVEL": "LOUD"},
        {"MOSS_SPEECH_MIN_NEW_TOKENS": "600"},
        {"MOSS_SPEECH_METRICS_PORT": "50051"},
        {"MOSS_SPEECH_MAX_MESSAGE_BYTES": "1.5e6"},
    ],
)
def test_invalid_env_fails(clean_env, env: dict[str, str]) -> None:
    for k, v in env.items():
        clean_env.setenv(k, v)
    with pytest.raises(ValidationError):
        s.ServiceSettings()


def test_every_field_documented() -> None:
    for name, info in s.ServiceSettings.model_fields.items():
        assert info.description and len(info.description) > 10, name


def test_env_table_has_one_row_per_field() -> None:
    rows = [r for r in s.env_table_markdown().splitlines() if r.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == [s.env_var(f) for f in s.ServiceSettings.model_fields]


def test_chart_values_settings_are_pydantic_defaults() -> None:
    settings = yaml.safe_load((CHART / "values.yaml").read_text())["orchestrator"]["settings"]
    defaults = s.field_defaults()
    assert set(settings) <= set(defaults), set(settings) - set(defaults)
    assert set(defaults) - set(settings) == CHART_DERIVED
    for key, value in settings.items():
        assert value == defaults[key] and type(value) is type(defaults[key]), key


def test_chart_schema_settings_section_is_generated() -> None:
    checked_in = json.loads((CHART / "values.schema.json").read_text())
    section = checked_in["properties"]["orchestrator"]["properties"]["settings"]
    assert section == s.chart_settings_schema(), (
        "regenerate: python -m moss_speech.services.settings --write-schema helm/moss-speech/values.schema.json"
    )


def test_chart_settings_schema_accepts_defaults_and_refuses_typos() -> None:
    schema = s.chart_settings_schema()
    jsonschema.validate(s.field_defaults(), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"temprature": 0.6}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"top_k": -1}, schema)


def test_docs_env_table_is_generated() -> None:
    docs = (REPO / "docs" / "deploy.md").read_text()
    assert s.docs_with_table(docs) == docs, (
        "regenerate: python -m moss_speech.services.settings --write-docs docs/deploy.md"
    )
    assert s.env_table_markdown() in docs
