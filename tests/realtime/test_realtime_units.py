"""Fast tests of the gateway's parts: G.711 against the ITU reference (Python's audioop), event validation, the
silero-vad endpointer on espeak-ng speech, and the service's cut of a spoken answer (TruncateReply)."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest

from moss_speech.services.realtime import events as ev
from moss_speech.services.realtime.audio import FORMATS, resample
from moss_speech.services.sessions import NoReplyError, Reply, SessionStore, truncate_reply


def _audioop():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pytest.importorskip("audioop")


@pytest.mark.parametrize("kind", ["audio/pcmu", "audio/pcma"])
def test_g711_equals_itu_reference_for_every_sample(kind):
    audioop = _audioop()
    lin2, to_lin = (
        (audioop.lin2ulaw, audioop.ulaw2lin) if kind == "audio/pcmu" else (audioop.lin2alaw, audioop.alaw2lin)
    )
    every = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)
    fmt = FORMATS[kind]
    assert fmt.from_pcm16(every) == lin2(every.tobytes(), 2)
    codes = bytes(range(256))
    assert fmt.to_pcm16(codes).tobytes() == to_lin(codes, 2)
    assert fmt.ms(8000) == 1000.0


def test_pcm_format_roundtrip_and_resample():
    x = (np.sin(np.linspace(0, 200, 24000)) * 10000).astype(np.int16)
    fmt = FORMATS["audio/pcm"]
    assert np.array_equal(fmt.to_pcm16(fmt.from_pcm16(x)), x)
    assert fmt.ms(48000) == 1000.0
    assert len(resample(x, 24000, 8000)) == 8000


def test_client_events_validate():
    e = ev.parse_client_event(
        {
            "type": "session.update",
            "session": {
                "type": "realtime",
                "instructions": "hi",
                "tracing": "auto",  # unknown options are ignored
                "audio": {"input": {"format": {"type": "audio/pcmu"}, "turn_detection": None}},
            },
        }
    )
    assert e.session.audio.input.format.type == "audio/pcmu"
    assert "turn_detection" in e.session.audio.input.model_fields_set and e.session.audio.input.turn_detection is None
    for bad, code in [
        ([], "invalid_event"),
        ({"type": 3}, "invalid_event"),
        ({"type": "nope"}, "unknown_event_type"),
        ({"type": "input_audio_buffer.append"}, "invalid_value"),
        (
            {
                "type": "session.update",
                "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}},
            },
            "invalid_value",
        ),
        (
            {"type": "conversation.item.truncate", "item_id": "x", "content_index": 0, "audio_end_ms": -1},
            "invalid_value",
        ),
    ]:
        with pytest.raises(ev.ProtocolError) as info:
            ev.parse_client_event(bad)
        assert info.value.code == code, bad
    with pytest.raises(ev.ProtocolError) as info:
        ev.b64decode("not base64!", "audio")
    assert info.value.code == "invalid_base64"


def test_server_events_match_the_sdk_models():
    rt = pytest.importorskip("openai.types.realtime")
    from pydantic import TypeAdapter

    adapter = TypeAdapter(rt.RealtimeServerEvent)
    resp = ev.response_obj(
        "resp_1",
        "conv_1",
        "cancelled",
        ["audio"],
        "default",
        {"type": "audio/pcm", "rate": 24000},
        [ev.assistant_item("item_1", "audio", "incomplete", "hi")],
        reason="turn_detected",
        usage=ev.usage_obj(10, 5, True, True),
    )
    for e in [
        ev.event("response.done", response=resp),
        ev.error_event(ev.ProtocolError("invalid_json", "bad"), "evt_1"),
        ev.rate_limits_event({"turns": {"limit": 600.0, "remaining": 598.0, "reset": 59.5}}),
        ev.event(
            "conversation.item.added",
            previous_item_id=None,
            item=ev.user_item("item_2", [{"type": "input_text", "text": "x"}]),
        ),
    ]:
        assert adapter.validate_python(e).type == e["type"]


def _speech(text: str) -> np.ndarray:
    wav = subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "--stdout", text], capture_output=True).stdout
    if not wav:
        pytest.skip("needs espeak-ng")
    raw = subprocess.run(
        ["sox", "-t", "wav", "-", "-t", "raw", "-r", "16000", "-c", "1", "-b", "16", "-e", "signed-integer", "-L", "-"],
        input=wav,
        capture_output=True,
    ).stdout
    return np.frombuffer(raw, dtype="<i2")


@pytest.mark.parametrize("noise_dbfs", [None, -50.0])
def test_vad_endpointing_on_speech_and_silence(noise_dbfs):
    from moss_speech.services.realtime.vad import Endpointer, VadConfig

    speech = _speech("What is the tallest mountain in the world?")
    silence = np.zeros(16000, np.int16)
    audio = np.concatenate([silence, speech, silence]).astype(np.float64)
    if noise_dbfs is not None:  # a microphone's noise floor under the whole stream
        audio += np.random.default_rng(0).normal(0, 32768 * 10 ** (noise_dbfs / 20), len(audio))
    audio = np.clip(audio, -32768, 32767).astype(np.int16)
    cfg = VadConfig(prefix_padding_ms=200, silence_duration_ms=400)
    voiced = np.nonzero(np.abs(speech) > 500)[0]
    onset_ms, offset_ms = 1000 + voiced[0] / 16, 1000 + voiced[-1] / 16
    for piece in (160, 320, 2400):  # 10 ms, 20 ms (as the page sends) and 150 ms appends
        e = Endpointer(cfg)
        events = []
        for i in range(0, len(audio), piece):
            got = e.feed(audio[i : i + piece])
            events += [(x, i + piece) for x in got]
        assert [x.kind for x, _ in events] == ["start", "stop"], events
        (start, _), (stop, fed) = events
        assert abs(start.ms - (onset_ms - 200)) <= 100
        # The turn ends where the speech's energy ended plus the configured silence (not ~100 ms later, where
        # silero's probability falls), as soon as the audio up to that point has arrived.
        assert offset_ms + 400 - 20 <= stop.ms <= offset_ms + 400 + 15, (piece, stop.ms - offset_ms - 400)
        assert fed < 16 * stop.ms + piece + 1, (piece, fed / 16 - stop.ms)  # no waiting for a later frame
    e2 = Endpointer(cfg)
    assert sum((e2.feed(silence) for _ in range(3)), []) == []  # silence alone: nothing


def test_vad_runs_without_torch():
    code = (
        "import sys; from moss_speech.services.realtime.vad import Endpointer, VadConfig; import numpy as np; "
        "Endpointer(VadConfig()).feed(np.zeros(4096, np.int16)); "
        "import moss_speech.services.realtime.server; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- TruncateReply on synthetic grids (ids as in the real checkpoint) ----------------------------------------
PAD, APAD, SOSP, EOSP, IM_END, NL = 151667, 512, 151646, 16384, 151645, 198


def _turn(codes: list[int], eosp: bool, closed: bool) -> tuple[np.ndarray, np.ndarray]:
    user = np.array([[151644, APAD], [872, APAD], [NL, APAD], [9707, APAD], [IM_END, APAD], [NL, APAD]])
    prefix = np.array([[151644, APAD], [77091, APAD], [NL, APAD], [SOSP, APAD]])
    gen = [[PAD, c] for c in codes] + ([[PAD, EOSP], [1234, 77]] if eosp else [])
    if closed:
        gen.append([IM_END, 99])
    gen = np.array(gen)
    closing = np.array([[NL, APAD]]) if closed else np.array([[IM_END, APAD], [NL, APAD]])
    return np.concatenate([user, prefix, gen, closing]), gen


@pytest.mark.parametrize("eosp,closed", [(True, True), (False, False), (True, False)])
def test_truncate_reply_keeps_heard_tokens_and_closes_the_turn(eosp, closed):
    store = SessionStore(60, 4, 10_000)
    s = store.create()
    rows, gen = _turn(list(range(100, 120)), eosp, closed)
    with store.hold(s.session_id) as lease:
        lease.commit(rows, gen, "speech")
    kept, removed, history = store.truncate_reply(s.session_id, 700)  # 700 ms -> 9 tokens (8.75, partly heard)
    cut = s.turns[-1]
    assert kept == 9 and history == len(cut) and removed == len(rows) - len(cut)
    body = cut[10:]  # after the user turn (6 rows) and the reply prefix (4 rows)
    assert body[:9].tolist() == [[PAD, c] for c in range(100, 109)]
    tail = [[PAD, EOSP]] if eosp else []
    assert body[9:].tolist() == tail + [[IM_END, APAD], [NL, APAD]]
    # a later, shorter cut works; a longer one changes nothing
    assert store.truncate_reply(s.session_id, 5000)[1] == 0
    kept, removed, _ = store.truncate_reply(s.session_id, 80)
    assert kept == 1 and s.turns[-1][10:].tolist() == [[PAD, 100]] + tail + [[IM_END, APAD], [NL, APAD]]


def test_truncate_reply_refuses_text_answers_and_empty_sessions():
    store = SessionStore(60, 4, 10_000)
    s = store.create()
    with pytest.raises(NoReplyError):
        store.truncate_reply(s.session_id, 100)
    rows, gen = _turn([1, 2, 3], False, False)
    with store.hold(s.session_id) as lease:
        lease.commit(rows, gen, "text")
    with pytest.raises(NoReplyError):
        store.truncate_reply(s.session_id, 100)
    with pytest.raises(NoReplyError):
        truncate_reply(Reply.of(rows, 10, gen[:0], "speech"), 1)


def test_rate_limit_metadata_roundtrip():
    from moss_speech.services.limits import Limiter, Limits, parse_rate_limit_metadata, rate_limit_metadata

    now = [100.0]
    lim = Limiter(Limits(8, 4, 10, 60.0), clock=lambda: now[0])
    lim.turn("k", 2.5)
    now[0] += 20
    lim.turn("k", 1.0)
    parsed = parse_rate_limit_metadata(rate_limit_metadata(lim.remaining("k")) + (("x-request-id", "r"),))
    assert parsed == {
        "turns": {"limit": 10.0, "remaining": 8.0, "reset": 40.0},
        "audio-seconds": {"limit": 60.0, "remaining": 56.5, "reset": 40.0},
    }
    e = ev.rate_limits_event(parsed)
    assert e["rate_limits"] == [{"name": "requests", "limit": 10, "remaining": 8, "reset_seconds": 40.0}]
    assert ev.rate_limits_event({}) is None
    assert parse_rate_limit_metadata((("x-ratelimit-limit-turns", "x"),)) == {}
