"""Created voices end to end: the real service (`moss-speech serve`, API keys on) in front of the session's real
tritonserver (`served`, the tiny CPU repository with the `voice` model), and a second tritonserver on the same
repository and voice store as another replica, restarted once."""

from __future__ import annotations

import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf

from moss_speech.builders.codec import SpeechCodec
from moss_speech.builders.codec.voice_store import STORE_ENV, VoiceStore, default_store_dir
from moss_speech.contract.voices import VoiceLimits
from moss_speech.model_repository.launcher import TritonServer
from moss_speech.services.api import speech_pb2 as pb
from moss_speech.services.api import speech_pb2_grpc
from moss_speech.services.auth import hash_key

from .voice_support import espeak

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "service"))
from service_support import ServiceProcess, restart_triton, start_triton  # noqa: E402

pytestmark = pytest.mark.slow
KEYS = {"alice": "msk_alice_test_key_0123456789", "bob": "msk_bob_test_key_0123456789"}
GREEDY = pb.Sampling(do_sample=False, max_new_tokens=24, min_new_tokens=24)


def auth(who: str) -> tuple:
    return (("authorization", f"Bearer {KEYS[who]}"),)


def start_service(triton_url: str, tmp: Path) -> ServiceProcess:
    keys = tmp / "keys"
    keys.write_text("".join(f"{k}:{hash_key(v)}\n" for k, v in KEYS.items()))
    return ServiceProcess(
        triton_url,
        tmp / "service.log",
        MOSS_SPEECH_AUTH="api_keys",
        MOSS_SPEECH_API_KEYS_FILE=str(keys),
        MOSS_SPEECH_MAX_NEW_TOKENS="24",
        MOSS_SPEECH_MAX_MESSAGE_BYTES=str(4 << 20),
    ).start()  # a 31 s WAV is 1.4 MB


@pytest.fixture(scope="module")
def svc(served, tmp_path_factory):
    s = start_service(served.grpc_url, tmp_path_factory.mktemp("voice-service"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(svc):
    with grpc.insecure_channel(svc.address) as ch:
        yield speech_pb2_grpc.MossSpeechStub(ch)


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    return espeak(tmp_path_factory.mktemp("rec") / "m3.wav", voice="en+m3")


@pytest.fixture(scope="module")
def created(stub, recording):
    return stub.CreateVoice(
        pb.CreateVoiceRequest(name="m3", description="espeak en+m3", audio=pb.AudioInput(data=recording.read_bytes())),
        metadata=auth("alice"),
        timeout=300,
    )


def speak(stub, voice: str, who: str = "alice") -> np.ndarray:
    r = stub.Converse(
        pb.ConverseRequest(text="hello there", voice=voice, sampling=GREEDY), metadata=auth(who), timeout=300
    )
    return np.frombuffer(r.audio_pcm16, dtype="<i2")


def test_created_voice_conditioning_equals_in_process(created, served, tiny_bundle, recording):
    assert created.voice_id.startswith("vc_") and created.name == "m3" and not created.builtin
    assert created.duration_seconds == pytest.approx(sf.info(str(recording)).duration, abs=1e-3)
    _, stored = VoiceStore(default_store_dir(Path(served.repo))).conditioning(created.voice_id)
    codec = SpeechCodec(tiny_bundle / "codec")
    ref = codec.make_voice("ref", recording, prompt_tokens=VoiceLimits().prompt_tokens)  # the served cap
    assert created.prompt_tokens == len(ref.prompt_codes) == VoiceLimits().prompt_tokens
    assert len(codec.make_voice("whole", recording).prompt_codes) > 4 * VoiceLimits().prompt_tokens
    np.testing.assert_array_equal(stored["prompt_codes"], ref.prompt_codes)
    np.testing.assert_allclose(stored["prompt_mel"], ref.prompt_mel, rtol=0, atol=0)
    np.testing.assert_allclose(stored["xvector"], ref.xvector, rtol=0, atol=0)
    assert np.abs(stored["xvector"] - codec.voices.get("default").xvector).max() > 1e-2


def test_list_get_and_ownership(stub, created):
    mine = stub.ListVoices(pb.ListVoicesRequest(), metadata=auth("alice"))
    by_id = {v.voice_id: v for v in mine.voices}
    assert by_id["default"].builtin and by_id["default"].is_default
    assert by_id[created.voice_id].duration_seconds > 3 and by_id[created.voice_id].created_unix > 0
    assert created.voice_id not in {
        v.voice_id for v in stub.ListVoices(pb.ListVoicesRequest(), metadata=auth("bob")).voices
    }
    assert stub.GetVoice(pb.GetVoiceRequest(voice_id=created.voice_id), metadata=auth("alice")).name == "m3"
    for call in (
        lambda: stub.GetVoice(pb.GetVoiceRequest(voice_id=created.voice_id), metadata=auth("bob")),
        lambda: speak(stub, created.voice_id, "bob"),
        lambda: stub.DeleteVoice(pb.DeleteVoiceRequest(voice_id=created.voice_id), metadata=auth("bob")),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()


def test_created_voice_audio_differs_and_repeats_across_replicas_and_restart(stub, created, cpu_repo, tmp_path):
    default = speak(stub, "default")
    cloned = speak(stub, created.voice_id)
    assert cloned.size and cloned.size == default.size
    assert np.abs(cloned.astype(np.int32) - default).max() > 100
    np.testing.assert_array_equal(speak(stub, created.voice_id), cloned)  # again (either vocoder instance)
    other = start_triton(cpu_repo)  # another replica: same repository, same voice store, fresh caches
    try:
        svc2 = start_service(other.grpc_url, tmp_path)
        try:
            with grpc.insecure_channel(svc2.address) as ch:
                np.testing.assert_array_equal(speak(speech_pb2_grpc.MossSpeechStub(ch), created.voice_id), cloned)
            other.stop()
            other = restart_triton(other)
            svc2.wait_health("SERVING", timeout=120)
            with grpc.insecure_channel(svc2.address) as ch:
                np.testing.assert_array_equal(speak(speech_pb2_grpc.MossSpeechStub(ch), created.voice_id), cloned)
        finally:
            svc2.stop()
    finally:
        other.stop()


BAD = {
    "too_short": (lambda rec: rec[: int(1.5 * 22050)], 22050, "too short"),
    "too_long": (lambda rec: np.tile(rec, 8)[: 31 * 22050], 22050, "too long"),
    "silence": (lambda rec: np.zeros(5 * 16000, np.float32), 16000, "silent"),
    "near_silence": (lambda rec: rec * 0.002, 22050, "silent"),
    "clipped": (lambda rec: np.clip(rec * 30, -1, 1), 22050, "clipped"),
}


@pytest.mark.parametrize("case", list(BAD) + ["undecodable", "raw_without_rate", "empty_name"])
def test_invalid_recordings_are_refused_and_nothing_is_stored(stub, served, recording, case, tmp_path):
    store = default_store_dir(Path(served.repo))
    before = sorted(p.name for p in store.iterdir())
    name, audio = "bad", None
    if case in BAD:
        make, rate, words = BAD[case]
        rec, rec_rate = sf.read(str(recording), dtype="float32")
        path = tmp_path / "bad.wav"
        sf.write(str(path), make(rec).astype(np.float32), rate, subtype="PCM_16")
        audio = pb.AudioInput(data=path.read_bytes())
    elif case == "undecodable":
        audio, words = pb.AudioInput(data=b"this is not audio at all" * 100), "cannot decode"
    elif case == "raw_without_rate":
        audio = pb.AudioInput(data=b"\0\0" * 80000, format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_PCM16))
        words = "sample_rate"
    else:
        name, audio, words = "  ", pb.AudioInput(data=recording.read_bytes()), "name is empty"
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateVoice(pb.CreateVoiceRequest(name=name, audio=audio), metadata=auth("alice"), timeout=120)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in err.value.details(), err.value.details()
    assert "/" not in err.value.details().split("[request_id")[0]  # no paths leak
    assert sorted(p.name for p in store.iterdir()) == before


def test_deleted_voice_is_not_found_on_the_next_turn(stub, recording):
    v = stub.CreateVoice(
        pb.CreateVoiceRequest(name="tmp", audio=pb.AudioInput(data=recording.read_bytes())),
        metadata=auth("alice"),
        timeout=300,
    )
    assert speak(stub, v.voice_id).size
    stub.DeleteVoice(pb.DeleteVoiceRequest(voice_id=v.voice_id), metadata=auth("alice"))
    for call in (
        lambda: speak(stub, v.voice_id),
        lambda: stub.GetVoice(pb.GetVoiceRequest(voice_id=v.voice_id), metadata=auth("alice")),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value.details()


def test_per_key_limit_then_delete_frees_a_slot(cpu_repo, recording, tmp_path):
    """A Triton replica with the limit set low (2) and its own store: the third voice of a key is refused with
    RESOURCE_EXHAUSTED (nothing stored), another key is not affected, and after a delete the key creates again."""
    store = tmp_path / "store"
    srv = TritonServer(
        cpu_repo,
        http_port=None,
        grpc_port=None,
        metrics_port=None,
        ready_timeout=300,
        stop_timeout=20,
        env={"MOSS_SPEECH_MAX_VOICES_PER_KEY": "2", STORE_ENV: str(store)},
    )
    srv.start()
    try:
        svc2 = start_service(srv.grpc_url, tmp_path)
        try:
            with grpc.insecure_channel(svc2.address) as ch:
                stub2 = speech_pb2_grpc.MossSpeechStub(ch)

                def create(who: str, name: str):
                    return stub2.CreateVoice(
                        pb.CreateVoiceRequest(name=name, audio=pb.AudioInput(data=recording.read_bytes())),
                        metadata=auth(who),
                        timeout=300,
                    )

                first, _ = create("alice", "a1"), create("alice", "a2")
                with pytest.raises(grpc.RpcError) as err:
                    create("alice", "a3")
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value.details()
                assert "2 voices" in err.value.details() and "delete one" in err.value.details()
                assert len(VoiceStore(store).records()) == 2  # nothing stored for the refused one
                assert create("bob", "b1").voice_id  # the limit is per key
                stub2.DeleteVoice(pb.DeleteVoiceRequest(voice_id=first.voice_id), metadata=auth("alice"))
                again = create("alice", "a3")
                names = {
                    v.name
                    for v in stub2.ListVoices(pb.ListVoicesRequest(), metadata=auth("alice")).voices
                    if not v.builtin
                }
                assert names == {"a2", "a3"} and again.voice_id != first.voice_id
        finally:
            svc2.stop()
    finally:
        srv.stop()
