"""Write a Triton model repository: config.pbtxt per model (from `model_repository/templates`, tensors from
`moss_speech.contract.tensors`) and one-line `model.py` shims importing the adapters of
`moss_speech.model_repository.adapters`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2

from moss_speech.contract import tensors as T
from moss_speech.contract import window
from moss_speech.contract.serving import ServingConfig

SHIM = """# Written by `moss-speech build`. The adapter lives in the library; this file only names it.
from moss_speech.model_repository.adapters.{module} import TritonPythonModel  # noqa: F401
"""


def _templates() -> jinja2.Environment:
    import moss_speech.model_repository as pkg

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(Path(pkg.__file__).parent / "templates"),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def _internal(name: str) -> str:
    """The ensemble's name for an llm output on its way to the vocoder."""
    return f"llm_{name.lower()}"


def ensemble_steps(ensemble: T.Model) -> list[dict[str, Any]]:
    """The steps of an ensemble as (key, value) maps: [speech_encoder ->] llm -> vocoder."""
    speech_in = ensemble.inputs[0] == T.AUDIO
    steps = []
    if speech_in:
        steps.append(
            {
                "model": T.SPEECH_ENCODER.name,
                "inputs": [(T.AUDIO.name, T.AUDIO.name)],
                "outputs": [(T.CODES.name, "codes")],
            }
        )
    user = [(T.CODES.name, "codes")] if speech_in else [(T.TEXT.name, T.TEXT.name)]
    steps.append(
        {
            "model": T.LLM.name,
            "inputs": user + [(t.name, t.name) for t in T.TURN_INPUTS],
            "outputs": [(t.name, _internal(t.name)) for t in T.LLM.outputs],
        }
    )
    own = [(t.name, t.name) for t in T.VOCODER_OWN]
    passed = [(t.name + T.PASSTHROUGH_SUFFIX, t.name) for t in T.PASSTHROUGH]
    steps.append(
        {
            "model": T.VOCODER.name,
            "inputs": [(t.name, _internal(t.name)) for t in T.VOCODER.inputs],
            "outputs": own + passed,
        }
    )
    return steps


def write_repository(
    out: str | Path,
    serving: ServingConfig,
    checkpoint_dir: str | Path,
    codec_dir: str | Path,
    llm_artifact: str | None = None,
    codec_artifacts: str | None = None,
) -> list[Path]:
    """Render every model of the repository into `out`. Artifact paths are relative to `out`, so the
    repository can move (a PVC mounted elsewhere); checkpoint and codec paths are used as given."""
    out = Path(out)
    env = _templates()
    common = {"serving": serving.model_dump_json()}
    codec = common | {"codec_dir": str(Path(codec_dir).resolve()), "codec_artifacts": codec_artifacts or ""}
    # The service's ListVoices reads this list from the vocoder's config (voice id = WAV file stem).
    voices = sorted(p.stem for p in (Path(codec_dir) / "voices").glob("*.wav"))
    params = {
        T.SPEECH_ENCODER.name: codec,
        T.LLM.name: common
        | {"checkpoint_dir": str(Path(checkpoint_dir).resolve()), "llm_artifact": llm_artifact or ""},
        T.VOCODER.name: codec | {"voices": ",".join(voices)},
        # The voice model runs the speech encoder's graphs (its artifact folder; nothing of its own to install).
        T.VOICE_MODEL.name: codec
        | {"codec_artifacts": (codec_artifacts or "").replace("{model}", T.SPEECH_ENCODER.name)},
    }
    written = []
    for model in T.PYTHON_MODELS:
        (out / model.name / "1").mkdir(parents=True, exist_ok=True)
        (out / model.name / "1" / "model.py").write_text(SHIM.format(module=model.name))
        text = env.get_template(f"{model.name}.pbtxt.j2").render(
            model=model, serving=serving, model_params=params[model.name], window_fields=window.META_FIELDS
        )
        (out / model.name / "config.pbtxt").write_text(text)
        written.append(out / model.name)
    for model in T.ENSEMBLES:
        (out / model.name / "1").mkdir(parents=True, exist_ok=True)
        text = env.get_template("ensemble.pbtxt.j2").render(
            model=model, serving=serving, speech_in=model.inputs[0] == T.AUDIO, steps=ensemble_steps(model)
        )
        (out / model.name / "config.pbtxt").write_text(text)
        written.append(out / model.name)
    return written
