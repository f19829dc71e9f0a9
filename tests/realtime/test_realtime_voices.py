"""Created voices through the Realtime gateway (real gateway, service and tritonserver): a voice created with
CreateVoice is accepted by `session.update` and a response speaks with it; the turn really carries that id (once
the voice is deleted, the next response fails with the service's "unknown voice"); an unknown voice id is an
`error` event and leaves the session's voice as it was."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from moss_speech.services.api import speech_pb2 as pb
from moss_speech.services.api import speech_pb2_grpc

pytest.importorskip("openai")
from test_realtime_openai import audio_of, connect, opened  # noqa: E402

from tests.voices.voice_support import espeak  # noqa: E402

pytestmark = pytest.mark.slow


def set_voice(voice: str) -> dict:
    return {"type": "session.update", "session": {"type": "realtime", "audio": {"output": {"voice": voice}}}}


ASK = {
    "type": "conversation.item.create",
    "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Say hello."}]},
}


def test_created_voice_is_used_and_unknown_voice_is_an_error(realtime_stack, tmp_path):
    rec = espeak(tmp_path / "m3.wav", voice="en+m3")
    with grpc.insecure_channel(f"127.0.0.1:{realtime_stack.service_port}") as ch:
        stub = speech_pb2_grpc.MossSpeechStub(ch)
        voice = stub.CreateVoice(
            pb.CreateVoiceRequest(name="m3", audio=pb.AudioInput(data=rec.read_bytes())), timeout=300
        ).voice_id

        async def main():
            async with connect(realtime_stack) as conn:  # after CreateVoice: the gateway lists voices on connect
                c = await opened(conn)
                await c.send(set_voice(voice))
                updated, _ = await c.until("session.updated", timeout=20)
                assert updated["session"]["audio"]["output"]["voice"] == voice
                await c.send_raw(json.dumps(set_voice("vc_" + "0" * 24)))  # well formed, never created
                err, _ = await c.until("error", timeout=20)
                assert err["error"]["code"] == "invalid_value"
                assert err["error"]["param"] == "session.audio.output.voice"
                assert "vc_000" in err["error"]["message"] and ".py" not in err["error"]["message"]

                await c.send(ASK)
                await c.until("conversation.item.added")
                await c.send({"type": "response.create", "response": {"output_modalities": ["audio"]}})
                done, got = await c.until("response.done")
                assert done["response"]["status"] in ("completed", "incomplete"), done  # incomplete: 25-token cap
                assert done["response"]["audio"]["output"]["voice"] == voice  # not the default: the update held
                assert len(audio_of(got)) > 0

                # The turn carries the id to the service: deleted, the next response fails on it.
                stub.DeleteVoice(pb.DeleteVoiceRequest(voice_id=voice), timeout=60)
                await c.send(ASK)
                await c.until("conversation.item.added")
                await c.send({"type": "response.create", "response": {"output_modalities": ["audio"]}})
                err, got = await c.until("error")
                assert "unknown voice" in err["error"]["message"] and voice in err["error"]["message"]
                done, got = await c.until("response.done")
                assert done["response"]["status"] == "failed" and not audio_of(got)

        asyncio.run(main())
