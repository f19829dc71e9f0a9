"""Realtime gateway benchmark: the WebSocket path against the gRPC path it wraps, in the same run.

  python bench/realtime_bench.py --triton-url 127.0.0.1:8001     # a running tritonserver (moss-speech up / triton)

Starts the gRPC service and the gateway as subprocesses (as in production: separate processes), then measures
1. time to first audio through the WebSocket vs through gRPC StreamConverse, paired and alternating (same audio,
   same answer length): manual turns, the clock starts when the turn is handed over (`response.create` /
   `end_of_turn`) and stops at the first audio the client receives;
2. barge-in: from the `speech_started` event the client receives to the last audio delta it receives;
3. endpointing: audio sent in real time (40 ms pieces); `speech_stopped` arriving, minus the configured
   `silence_duration_ms`, counted from the send of the piece holding the last voiced sample (as before; it carries
   this audio's fixed piece-phase offset, +20 ms for the bench question) and from the send of the piece that
   completes the configured silence after that sample (the gateway's own delay: what the client could not have
   sent earlier is not counted);
4. a soak: N concurrent WebSocket conversations (server VAD, spoken turns) for D seconds; errors counted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moss_speech.services.api import speech_pb2, speech_pb2_grpc  # noqa: E402
from tests.realtime.conftest import speak, start_gateway, start_service  # noqa: E402

PIECE = 960  # 40 ms at 24 kHz


class WS:
    def __init__(self, ws) -> None:
        self.ws = ws

    async def send(self, **event) -> None:
        await self.ws.send(json.dumps(event))

    async def until(self, kind: str, timeout: float = 120) -> tuple[dict, float, list]:
        seen = []
        while True:
            e = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
            t = time.perf_counter()
            seen.append((e, t))
            if e["type"] == "error" and kind != "error":
                raise RuntimeError(e["error"])
            if e["type"] == kind:
                return e, t, seen

    async def append(self, pcm: np.ndarray, realtime: bool = False) -> list[float]:
        data = pcm.astype("<i2").tobytes()
        sent, t0 = [], time.perf_counter()
        for k, i in enumerate(range(0, len(data), 2 * PIECE)):
            if realtime:
                await asyncio.sleep(max(0.0, t0 + k * PIECE / 24000 - time.perf_counter()))
            await self.send(type="input_audio_buffer.append", audio=base64.b64encode(data[i : i + 2 * PIECE]).decode())
            sent.append(time.perf_counter())
        return sent


async def ttfa_pair(url: str, stub, question: np.ndarray, tokens: int) -> tuple[float, float]:
    async with connect(url, max_size=None) as raw:
        ws = WS(raw)
        await ws.until("session.created")
        await ws.send(
            type="session.update",
            session={"type": "realtime", "max_output_tokens": tokens, "audio": {"input": {"turn_detection": None}}},
        )
        await ws.until("session.updated")
        await ws.append(question)
        await ws.send(type="input_audio_buffer.commit")
        await ws.until("input_audio_buffer.committed")
        t0 = time.perf_counter()
        await ws.send(type="response.create")
        _, t1, _ = await ws.until("response.output_audio.delta")
        await ws.until("response.done")
    ws_ms = 1000 * (t1 - t0)

    sid = (await stub.CreateSession(speech_pb2.CreateSessionRequest())).session_id
    pcm = question.astype("<i2").tobytes()
    start = asyncio.Event()
    marks = {}

    async def requests():
        yield speech_pb2.StreamConverseRequest(
            config=speech_pb2.StreamConfig(
                session_id=sid,
                sampling=speech_pb2.Sampling(max_new_tokens=tokens),
                input_format=speech_pb2.AudioFormat(encoding=speech_pb2.AUDIO_ENCODING_PCM16, sample_rate=24000),
            )
        )
        for i in range(0, len(pcm), 2 * PIECE):
            yield speech_pb2.StreamConverseRequest(audio=pcm[i : i + 2 * PIECE])
        await start.wait()
        marks["t0"] = time.perf_counter()
        yield speech_pb2.StreamConverseRequest(end_of_turn=speech_pb2.EndOfTurn())

    call = stub.StreamConverse(requests())
    await asyncio.sleep(0.05)  # the audio is across before the clock starts, as on the WebSocket side
    start.set()
    async for msg in call:
        if msg.WhichOneof("kind") == "audio" and "t1" not in marks:
            marks["t1"] = time.perf_counter()
    await stub.DeleteSession(speech_pb2.DeleteSessionRequest(session_id=sid))
    return ws_ms, 1000 * (marks["t1"] - marks["t0"])


async def barge_in(url: str, question: np.ndarray) -> float:
    async with connect(url, max_size=None) as raw:
        ws = WS(raw)
        await ws.until("session.created")
        await ws.send(
            type="session.update",
            session={
                "type": "realtime",
                "max_output_tokens": 300,
                "audio": {"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}},
            },
        )
        await ws.until("session.updated")
        silence = np.zeros(12000, np.int16)
        await ws.append(np.concatenate([silence, question, silence, silence]))
        _, _, seen = await ws.until("response.output_audio.delta")
        sender = asyncio.create_task(ws.append(question, realtime=True))
        _, t_start, seen2 = await ws.until("input_audio_buffer.speech_started")
        done, _, seen3 = await ws.until("response.done")
        sender.cancel()
        assert done["response"]["status"] == "cancelled", done["response"]["status"]
        deltas = [t for e, t in seen + seen2 + seen3 if e["type"] == "response.output_audio.delta"]
        return 1000 * (deltas[-1] - t_start)


async def endpointing(url: str, question: np.ndarray, silence_ms: int) -> tuple[float, float]:
    async with connect(url, max_size=None) as raw:
        ws = WS(raw)
        await ws.until("session.created")
        await ws.send(
            type="session.update",
            session={
                "type": "realtime",
                "audio": {
                    "input": {
                        "turn_detection": {
                            "type": "server_vad",
                            "silence_duration_ms": silence_ms,
                            "create_response": False,
                        }
                    }
                },
            },
        )
        await ws.until("session.updated")
        audio = np.concatenate([np.zeros(12000, np.int16), question, np.zeros(24000 * 2, np.int16)])
        offset = 12000 + int(np.nonzero(np.abs(question) > 500)[0][-1])  # last voiced sample
        sender = asyncio.create_task(ws.append(audio, realtime=True))
        _, t_stop, _ = await ws.until("input_audio_buffer.speech_stopped")
        sent = await sender
        t_offset_sent = sent[offset // PIECE]
        t_silence_sent = sent[(offset + silence_ms * 24) // PIECE]
        return 1000 * (t_stop - t_offset_sent) - silence_ms, 1000 * (t_stop - t_silence_sent)


async def soak(url: str, question: np.ndarray, conversations: int, duration: float) -> dict:
    stats = {"turns": 0, "errors": 0, "error_kinds": {}}
    end = time.monotonic() + duration

    async def one(i: int) -> None:
        try:
            async with connect(url, max_size=None) as raw:
                ws = WS(raw)
                await ws.until("session.created")
                await ws.send(type="session.update", session={"type": "realtime", "max_output_tokens": 25})
                await ws.until("session.updated")
                silence = np.zeros(18000, np.int16)
                while time.monotonic() < end:
                    await ws.append(np.concatenate([silence, question, silence]))
                    done, _, _ = await ws.until("response.done", timeout=300)
                    if done["response"]["status"] not in ("completed", "incomplete"):
                        raise RuntimeError(f"response {done['response']['status']}")
                    stats["turns"] += 1
        except Exception as e:  # noqa: BLE001 - counted
            stats["errors"] += 1
            kind = f"{type(e).__name__}: {str(e)[:120]}"
            stats["error_kinds"][kind] = stats["error_kinds"].get(kind, 0) + 1

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(conversations)))
    stats["seconds"] = round(time.monotonic() - t0, 1)
    return stats


def summary(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.1f} ms (min {min(xs):.1f}, max {max(xs):.1f}, n={len(xs)})"


async def main_async(args, url: str, grpc_address: str) -> None:
    question = speak("What is the tallest mountain in the world?")
    if args.repeats:
        async with grpc.aio.insecure_channel(grpc_address) as channel:
            stub = speech_pb2_grpc.MossSpeechStub(channel)
            await ttfa_pair(url, stub, question, args.tokens)  # warm-up
            ws_ms, grpc_ms = [], []
            for _ in range(args.repeats):
                a, b = await ttfa_pair(url, stub, question, args.tokens)
                ws_ms.append(a)
                grpc_ms.append(b)
        diffs = [a - b for a, b in zip(ws_ms, grpc_ms, strict=True)]
        print(f"\n## time to first audio (manual turn, {args.tokens} speech tokens max)")
        print(f"  WebSocket  {summary(ws_ms)}")
        print(f"  gRPC       {summary(grpc_ms)}")
        print(f"  paired differences WebSocket - gRPC: {' '.join(f'{d:+.0f}' for d in diffs)}")
        print(f"  paired difference WebSocket - gRPC: median {statistics.median(diffs):+.1f} ms")
    if args.barge:
        barge = [await barge_in(url, question) for _ in range(args.barge)]
        print(f"\n## barge-in: speech_started -> last audio delta  {summary(barge)}")
    if args.endpoint:
        ends = [await endpointing(url, question, args.silence_ms) for _ in range(args.endpoint)]
        print(f"\n## endpointing delay beyond silence_duration_ms={args.silence_ms}")
        print(f"  from the last voiced sample's piece       {summary([a for a, _ in ends])}")
        print(f"  from the piece completing the silence     {summary([b for _, b in ends])}")
    if args.soak:
        s = await soak(url, question, args.conversations, args.soak)
        print(
            f"\n## soak: {args.conversations} WebSocket conversations for {s['seconds']} s: {s['turns']} turns, "
            f"{s['errors']} errors {s['error_kinds'] or ''}"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--triton-url", required=True)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--barge", type=int, default=5)
    p.add_argument("--endpoint", type=int, default=5)
    p.add_argument("--silence-ms", type=int, default=500)
    p.add_argument("--soak", type=float, default=0, help="soak seconds (0 = skip)")
    p.add_argument("--conversations", type=int, default=8)
    args = p.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="realtime-bench-"))
    service, sport = start_service(
        args.triton_url,
        logs,
        MOSS_SPEECH_MAX_NEW_TOKENS="40",
        MOSS_SPEECH_MAX_SESSIONS="100",
        MOSS_SPEECH_LOG_LEVEL="WARNING",
    )
    try:
        gateway, gport = start_gateway(sport, logs, MOSS_REALTIME_LOG_LEVEL="WARNING")
        try:
            asyncio.run(main_async(args, f"ws://127.0.0.1:{gport}/v1/realtime?model=moss-speech", f"127.0.0.1:{sport}"))
        finally:
            gateway.stop()
    finally:
        service.stop()
    print(f"(logs in {logs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
