"""The gateway end to end with the real `openai` SDK realtime client, a real service and a real tritonserver.

Every event the tests send is validated against the SDK's `RealtimeClientEvent` and every event received against
`RealtimeServerEvent` (pydantic validation, not the SDK's unchecked construction). The tiny model has random
weights: answers are speech-token audio of the right shape, not speech.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import urllib.request

import grpc
import numpy as np
import pytest

openai = pytest.importorskip("openai")
from openai.types.realtime import RealtimeClientEvent, RealtimeServerEvent  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

from moss_speech.services.api import speech_pb2, speech_pb2_grpc  # noqa: E402

pytestmark = pytest.mark.slow

CLIENT, SERVER = TypeAdapter(RealtimeClientEvent), TypeAdapter(RealtimeServerEvent)
TOKEN_MS = 80  # one speech token of output audio


class Client:
    """The SDK connection plus validation and a log of what arrived."""

    def __init__(self, conn) -> None:
        self.conn, self.seen = conn, []

    async def send(self, event: dict) -> None:
        CLIENT.validate_python(event)
        await self.conn.send(event)

    async def send_raw(self, data: str) -> None:  # deliberately invalid events
        await self.conn.send_raw(data)

    async def recv(self, timeout: float = 60) -> dict:
        raw = await asyncio.wait_for(self.conn.recv_bytes(), timeout)
        event = json.loads(raw)
        SERVER.validate_python(event)
        event["_t"] = time.perf_counter()
        self.seen.append(event)
        return event

    async def until(self, kind: str, timeout: float = 90) -> tuple[dict, list[dict]]:
        got = []
        deadline = time.monotonic() + timeout
        while True:
            e = await self.recv(max(0.1, deadline - time.monotonic()))
            got.append(e)
            if e["type"] == kind:
                return e, got

    async def append(self, pcm: np.ndarray, piece: int = 960, width: int = 2, raw: bytes | None = None) -> None:
        data = raw if raw is not None else pcm.astype("<i2").tobytes()
        step = piece * width
        for i in range(0, len(data), step):
            await self.send(
                {"type": "input_audio_buffer.append", "audio": base64.b64encode(data[i : i + step]).decode()}
            )


def connect(stack, **kw):
    client = openai.AsyncOpenAI(base_url=stack.base_url, api_key="sk-test-key", max_retries=0)
    return client.realtime.connect(model="moss-speech", **kw)


def audio_of(events: list[dict]) -> bytes:
    return b"".join(base64.b64decode(e["delta"]) for e in events if e["type"] == "response.output_audio.delta")


async def opened(conn) -> Client:
    c = Client(conn)
    first = await c.recv()
    assert first["type"] == "session.created"
    assert first["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
    return c


def test_sdk_builds_our_url(realtime_stack):
    client = openai.AsyncOpenAI(base_url=realtime_stack.base_url, api_key="x")
    mgr = client.realtime.connect(model="moss-speech")
    url = mgr._prepare_url()  # what the installed SDK connects to: base_url + /realtime, http -> ws
    assert str(url) == f"ws://127.0.0.1:{realtime_stack.port}/v1/realtime"


def test_spoken_turn_with_server_vad(realtime_stack, question):
    async def main():
        async with connect(realtime_stack) as conn:
            c = await opened(conn)
            await c.send(
                {
                    "type": "session.update",
                    "session": {
                        "type": "realtime",
                        "instructions": "Answer briefly.",
                        "audio": {
                            "input": {
                                "turn_detection": {
                                    "type": "server_vad",
                                    "silence_duration_ms": 400,
                                    "prefix_padding_ms": 200,
                                }
                            }
                        },
                    },
                }
            )
            updated, _ = await c.until("session.updated")
            assert updated["session"]["instructions"] == "Answer briefly."
            assert updated["session"]["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 400
            silence = np.zeros(24000, np.int16)
            await c.append(np.concatenate([silence[:12000], question, silence]))
            started, _ = await c.until("input_audio_buffer.speech_started")
            stopped, _ = await c.until("input_audio_buffer.speech_stopped")
            voiced = np.nonzero(np.abs(question) > 500)[0]
            onset, offset = 500 + voiced[0] / 24, 500 + voiced[-1] / 24
            assert abs(started["audio_start_ms"] - (onset - 200)) < 120
            assert offset + 400 <= stopped["audio_end_ms"] <= offset + 400 + 300
            committed, _ = await c.until("input_audio_buffer.committed")
            assert committed["item_id"] == started["item_id"] == stopped["item_id"]
            done, got = await c.until("response.done")
            kinds = [e["type"] for e in got]
            assert (
                kinds.index("response.created")
                < kinds.index("response.output_item.added")
                < kinds.index("response.content_part.added")
                < kinds.index("response.output_audio.delta")
                < kinds.index("response.output_audio.done")
                < kinds.index("response.output_item.done")
            )
            audio = audio_of(got)
            assert len(audio) == 25 * TOKEN_MS * 48  # 25 tokens of 24 kHz int16
            r = done["response"]
            assert r["status"] in ("completed", "incomplete") and r["usage"]["output_tokens"] == 25
            assert r["output"][0]["role"] == "assistant" and r["output"][0]["content"][0]["type"] == "output_audio"

    asyncio.run(main())


def test_manual_commit_turn_and_g711(realtime_stack, question):
    from moss_speech.services.realtime.audio import FORMATS, resample

    async def main():
        async with connect(realtime_stack) as conn:
            c = await opened(conn)
            await c.send(
                {
                    "type": "session.update",
                    "session": {
                        "type": "realtime",
                        "audio": {
                            "input": {"turn_detection": None, "format": {"type": "audio/pcmu"}},
                            "output": {"format": {"type": "audio/pcma"}},
                        },
                    },
                }
            )
            updated, _ = await c.until("session.updated")
            assert updated["session"]["audio"]["input"]["turn_detection"] is None
            ulaw = FORMATS["audio/pcmu"].from_pcm16(resample(question, 24000, 8000))
            await c.append(None, piece=800, width=1, raw=ulaw)
            await c.send({"type": "input_audio_buffer.commit"})
            committed, got = await c.until("input_audio_buffer.committed")
            assert not any(e["type"].startswith("response.") for e in got)  # manual turns: no automatic response
            await c.send({"type": "response.create"})
            done, got = await c.until("response.done")
            assert len(audio_of(got)) == 25 * TOKEN_MS * 8  # A-law: 8 kHz, one byte a sample
            assert not any(e["type"] == "input_audio_buffer.speech_started" for e in c.seen)

    asyncio.run(main())


def test_text_turn_with_text_output_and_multi_turn_history(realtime_stack):
    async def main():
        async with connect(realtime_stack) as conn:
            c = await opened(conn)
            prompts, remaining = [], []
            for question in ["Hello there.", "What is two plus two?", "And three plus three?"]:
                await c.send(
                    {
                        "type": "conversation.item.create",
                        "item": {
                            "type": "message",
                            "role": "user",
                            "content": [{"type": "input_text", "text": question}],
                        },
                    }
                )
                added, _ = await c.until("conversation.item.added")
                assert added["item"]["content"][0]["text"] == question
                await c.send({"type": "response.create", "response": {"output_modalities": ["text"]}})
                done, got = await c.until("response.done")
                assert not audio_of(got)
                text_done = [e for e in got if e["type"] == "response.output_text.done"]
                deltas = "".join(e["delta"] for e in got if e["type"] == "response.output_text.delta")
                assert len(text_done) == 1 and text_done[0]["text"] == deltas
                assert done["response"]["output_modalities"] == ["text"]
                prompts.append(done["response"]["usage"]["input_tokens"])
                # The service's per-key limits after the turn (validated against the SDK's model by recv).
                limits, _ = await c.until("rate_limits.updated")
                (rl,) = limits["rate_limits"]
                assert rl["name"] == "requests" and rl["limit"] == 600  # turns_per_minute_per_key's default
                assert 0 <= rl["remaining"] <= 600 - 1 and 0 < rl["reset_seconds"] <= 60
                remaining.append(rl["remaining"])
            assert prompts[0] < prompts[1] < prompts[2]  # each turn carries the history of the ones before
            assert remaining[2] < remaining[0]  # turns are being counted (older ones may leave the window)

    asyncio.run(main())


def test_response_cancel_then_answer_again(realtime_stack):
    async def main():
        async with connect(realtime_stack) as conn:
            c = await opened(conn)
            await c.send({"type": "session.update", "session": {"type": "realtime", "max_output_tokens": 300}})
            await c.until("session.updated")
            await c.send(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "Tell me a story."}],
                    },
                }
            )
            await c.send({"type": "response.create"})
            await c.until("response.output_audio.delta")
            await c.send({"type": "response.cancel"})
            done, got = await c.until("response.done")
            assert done["response"]["status"] == "cancelled"
            assert done["response"]["status_details"]["reason"] == "client_cancelled"
            assert len(audio_of(c.seen)) < 300 * TOKEN_MS * 48
            await c.send({"type": "response.cancel"})
            err, _ = await c.until("error")
            assert err["error"]["code"] == "response_cancel_not_active"
            # the cancelled turn never entered the history: its question is answered by the next response
            await c.send({"type": "response.create", "response": {"max_output_tokens": 10}})
            done, got = await c.until("response.done")
            assert done["response"]["status"] == "incomplete", done
            assert len(audio_of(got)) == 10 * TOKEN_MS * 48

    asyncio.run(main())


def test_barge_in_cancels_and_truncate_cuts_history(realtime_stack, question):
    async def main():
        async with connect(realtime_stack) as conn:
            c = await opened(conn)
            await c.send(
                {
                    "type": "session.update",
                    "session": {
                        "type": "realtime",
                        "max_output_tokens": 300,
                        "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}},
                    },
                }
            )
            await c.until("session.updated")
            silence = np.zeros(12000, np.int16)
            await c.append(np.concatenate([silence, question, silence, silence]))
            await c.until("response.output_audio.delta")
            # applies to the next response (the one answering after the interruption), not the running one
            await c.send({"type": "session.update", "session": {"type": "realtime", "max_output_tokens": 25}})
            await c.append(question)  # the user talks over the answer
            started, got = await c.until("input_audio_buffer.speech_started")
            t_start = started["_t"]
            done, after = await c.until("response.done")
            assert done["response"]["status"] == "cancelled"
            assert done["response"]["status_details"]["reason"] == "turn_detected"
            deltas = [e for e in c.seen if e["type"] == "response.output_audio.delta"]
            assert not any(e["type"] == "response.output_audio.delta" for e in after[after.index(done) :])
            barge_ms = 1000 * max(0.0, deltas[-1]["_t"] - t_start)
            print(f"barge-in: last audio delta {barge_ms:.1f} ms after speech_started")
            assert barge_ms < 500
            cancelled_item = done["response"]["output"][0]
            # truncating the cancelled answer: it never entered the model's history, the event still confirms
            await c.send(
                {
                    "type": "conversation.item.truncate",
                    "item_id": cancelled_item["id"],
                    "content_index": 0,
                    "audio_end_ms": 100,
                }
            )
            truncated, _ = await c.until("conversation.item.truncated")
            assert truncated["audio_end_ms"] == 100
            await c.append(np.concatenate([silence, silence, silence]))
            done, got = await c.until("response.done")  # the answer to both questions (the first was cut off)
            assert done["response"]["status"] == "incomplete", [e for e in got if e["type"] == "error"]
            answer = done["response"]["output"][0]["id"]
            await c.send(
                {"type": "conversation.item.truncate", "item_id": answer, "content_index": 0, "audio_end_ms": 5000}
            )
            err, _ = await c.until("error")
            assert err["error"]["code"] == "invalid_value" and err["error"]["param"] == "audio_end_ms"
            await c.send(
                {"type": "conversation.item.truncate", "item_id": answer, "content_index": 0, "audio_end_ms": 800}
            )
            truncated, _ = await c.until("conversation.item.truncated")
            assert truncated["item_id"] == answer
            await c.send({"type": "conversation.item.retrieve", "item_id": answer})
            item, _ = await c.until("conversation.item.retrieved")
            assert item["item"]["content"][0]["transcript"] == ""

    asyncio.run(main())


def test_truncate_reply_rpc_cuts_the_session_history(realtime_stack):
    """The service side of truncation, through the public gRPC API."""
    with grpc.insecure_channel(f"127.0.0.1:{realtime_stack.service_port}") as ch:
        stub = speech_pb2_grpc.MossSpeechStub(ch)
        sid = stub.CreateSession(speech_pb2.CreateSessionRequest(), timeout=10).session_id
        with pytest.raises(grpc.RpcError) as info:
            stub.TruncateReply(speech_pb2.TruncateReplyRequest(session_id=sid, audio_end_ms=100), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        r = stub.Converse(speech_pb2.ConverseRequest(session_id=sid, text="Hello."), timeout=120)
        speech = len(r.audio_pcm16) // 2 // (TOKEN_MS * 24)
        before = stub.GetSession(speech_pb2.GetSessionRequest(session_id=sid), timeout=10).history_tokens
        cut = stub.TruncateReply(speech_pb2.TruncateReplyRequest(session_id=sid, audio_end_ms=400), timeout=10)
        assert cut.speech_tokens == min(5, speech)
        after = stub.GetSession(speech_pb2.GetSessionRequest(session_id=sid), timeout=10).history_tokens
        assert after == cut.history_tokens == before - cut.removed_rows
        assert (cut.removed_rows > 0) == (speech > 5)
        with pytest.raises(grpc.RpcError) as info:
            stub.TruncateReply(speech_pb2.TruncateReplyRequest(session_id=sid, audio_end_ms=-1), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        stub.Converse(speech_pb2.ConverseRequest(session_id=sid, text="Go on."), timeout=120)  # still usable


def test_bad_events_get_errors_and_the_socket_stays_usable(realtime_stack):
    async def main():
        async with connect(realtime_stack) as conn:
            c = await opened(conn)

            async def expect(code: str, param: str | None = None) -> None:
                err, _ = await c.until("error", timeout=20)
                assert err["error"]["code"] == code, err
                if param:
                    assert err["error"]["param"] == param, err
                assert "Traceback" not in err["error"]["message"] and ".py" not in err["error"]["message"]

            await c.send_raw("{not json")
            await expect("invalid_json")
            await c.send_raw(json.dumps({"type": "session.nonsense", "event_id": "e1"}))
            await expect("unknown_event_type")
            assert c.seen[-1]["error"]["event_id"] == "e1"  # names the client event it answers
            await c.send_raw(json.dumps({"type": "input_audio_buffer.append", "audio": "@@@not-base64@@@"}))
            await expect("invalid_base64", "audio")
            await c.send_raw(
                json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"\x00" * 3).decode()})
            )
            await expect("invalid_audio")  # 3 bytes is not whole 16-bit samples
            big = base64.b64encode(b"\x00" * (1024 * 1024 + 2)).decode()
            await c.send_raw(json.dumps({"type": "input_audio_buffer.append", "audio": big}))
            await expect("input_audio_buffer_append_too_large")
            await c.send_raw(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {
                            "type": "realtime",
                            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
                        },
                    }
                )
            )
            await expect("invalid_value")
            await c.send_raw(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {"type": "realtime", "audio": {"output": {"voice": "no-such-voice"}}},
                    }
                )
            )
            await expect("invalid_value")
            await c.send({"type": "input_audio_buffer.commit"})
            await expect("input_audio_buffer_commit_empty")
            await c.send({"type": "response.create"})
            await expect("no_input")
            await c.send(
                {"type": "conversation.item.truncate", "item_id": "item_nope", "content_index": 0, "audio_end_ms": 10}
            )
            await expect("item_not_found", "item_id")
            await c.send({"type": "conversation.item.delete", "item_id": "item_nope"})
            await expect("item_not_found")
            await c.send(
                {
                    "type": "conversation.item.create",
                    "item": {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "x"}]},
                }
            )
            await expect("unsupported")
            await c.send(
                {
                    "type": "session.update",
                    "session": {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}},
                }
            )
            await expect("unsupported")
            # a text item, then one in the wrong state: a second response.create while the first runs
            await c.send(
                {
                    "type": "conversation.item.create",
                    "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi."}]},
                }
            )
            await c.send({"type": "response.create"})
            await c.send({"type": "response.create"})
            await expect("conversation_already_has_active_response")
            done, _ = await c.until("response.done")
            # delete an unanswered item
            await c.send(
                {
                    "type": "conversation.item.create",
                    "item": {
                        "id": "item_mine",
                        "type": "message",
                        "role": "user",
                        "content": [{"type": "input_text", "text": "never mind"}],
                    },
                }
            )
            await c.until("conversation.item.done")
            await c.send({"type": "conversation.item.delete", "item_id": "item_mine"})
            deleted, _ = await c.until("conversation.item.deleted")
            assert deleted["item_id"] == "item_mine"
            # still usable
            await c.send({"type": "session.update", "session": {"type": "realtime", "instructions": "ok"}})
            await c.until("session.updated")
            assert "moss_speech_realtime_errors_total" in realtime_stack.metrics()

    asyncio.run(main())


def test_connection_limit_and_http_routes(realtime_stack):
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import InvalidStatus

    async def main():
        open_ = []
        try:
            for _ in range(12):
                ws = await ws_connect(realtime_stack.ws_url)
                json.loads(await ws.recv())
                open_.append(ws)
            with pytest.raises(InvalidStatus) as info:
                await ws_connect(realtime_stack.ws_url)
            assert info.value.response.status_code == 503
        finally:
            for ws in open_:
                await ws.close()

    asyncio.run(main())
    base = f"http://127.0.0.1:{realtime_stack.port}"
    page = urllib.request.urlopen(base + "/", timeout=5).read().decode()
    assert "/v1/realtime" in page or "realtime" in page
    assert urllib.request.urlopen(base + "/healthz", timeout=5).status == 200
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(base + "/../etc/passwd", timeout=5)
    assert info.value.code == 404
    assert "moss_speech_realtime_active_connections" in realtime_stack.metrics()
