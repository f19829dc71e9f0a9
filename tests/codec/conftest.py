from pathlib import Path

import pytest

from moss_speech.builders.codec import SpeechCodec
from moss_speech.builders.codec.tiny import write_tiny_codec


@pytest.fixture(scope="session")
def tiny_codec_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("codec")
    write_tiny_codec(out, seed=0)
    return out


@pytest.fixture(scope="session")
def codec(tiny_codec_dir) -> SpeechCodec:
    return SpeechCodec(tiny_codec_dir)
