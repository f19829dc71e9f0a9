"""Write a Triton model repository: config.pbtxt per model (from `model_repository/templates`) and one-line
`model.py` shims importing the adapters of `moss_speech.model_repository.adapters`."""

from __future__ import annotations

from pathlib import Path

import jinja2

from moss_speech.builders.config import ServingConfig

LLM_OUTPUTS = ["WINDOW_TOKENS", "WINDOW_META", "VOICE_ID", "TEXT_TOKENS", "TEXT_DELTA", "ROWS", "TURN_ROWS",
               "FINAL", "USAGE"]
PASSTHROUGH = ["TEXT_TOKENS", "TEXT_DELTA", "ROWS", "TURN_ROWS", "FINAL", "USAGE"]
PYTHON_MODELS = ("speech_encoder", "llm", "vocoder")
ENSEMBLES = {"s2s": True, "t2s": False}  # name -> speech in
SHIM = """# Written by `moss-speech build`. The adapter lives in the library; this file only names it.
from moss_speech.model_repository.adapters.{module} import TritonPythonModel  # noqa: F401
"""


def _templates() -> jinja2.Environment:
    import moss_speech.model_repository as pkg

    return jinja2.Environment(loader=jinja2.FileSystemLoader(Path(pkg.__file__).parent / "templates"),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


def write_repository(out: str | Path, serving: ServingConfig, checkpoint_dir: str | Path, codec_dir: str | Path,
                     llm_artifact: str | None = None, codec_artifacts: str | None = None,
                     max_audio_seconds: float = 300.0) -> list[Path]:
    """Render every model of the repository into `out`. Artifact paths are relative to `out`, so the
    repository can move (a PVC mounted elsewhere); checkpoint and codec paths are used as given."""
    out = Path(out)
    env = _templates()
    common = {"serving": serving.model_dump_json()}
    codec = common | {"codec_dir": str(Path(codec_dir).resolve()), "codec_artifacts": codec_artifacts or ""}
    # The service's ListVoices reads this list from the vocoder's config (voice id = WAV file stem).
    voices = sorted(p.stem for p in (Path(codec_dir) / "voices").glob("*.wav"))
    params = {
        "encoder_params": codec | {"max_audio_seconds": str(max_audio_seconds)},
        "llm_params": common | {"checkpoint_dir": str(Path(checkpoint_dir).resolve()),
                                "llm_artifact": llm_artifact or ""},
        "vocoder_params": codec | {"voices": ",".join(voices)},
    }
    written = []
    for name in PYTHON_MODELS:
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        (out / name / "1" / "model.py").write_text(SHIM.format(module=name))
        text = env.get_template(f"{name}.pbtxt.j2").render(serving=serving, **params)
        (out / name / "config.pbtxt").write_text(text)
        written.append(out / name)
    for name, speech_in in ENSEMBLES.items():
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        text = env.get_template("ensemble.pbtxt.j2").render(name=name, speech_in=speech_in, serving=serving,
                                                            llm_outputs=LLM_OUTPUTS, passthrough=PASSTHROUGH)
        (out / name / "config.pbtxt").write_text(text)
        written.append(out / name)
    return written
