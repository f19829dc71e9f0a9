"""`moss-speech serve` (the gRPC service) and `moss-speech ask` (a streaming client)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the public gRPC service (settings from MOSS_SPEECH_* env and flags)")
    serve.add_argument("--triton-url", help="Triton gRPC host:port (MOSS_SPEECH_TRITON_URL)")
    serve.add_argument("--port", type=int, help="gRPC port (MOSS_SPEECH_GRPC_PORT)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port (MOSS_SPEECH_METRICS_PORT)")
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument("--log-format", choices=["json", "text"])
    serve.add_argument("--drain-seconds", type=float, help="graceful shutdown bound (MOSS_SPEECH_DRAIN_SECONDS)")
    serve.set_defaults(func=cmd_serve)

    ask = sub.add_parser("ask", help="ask the service one question, stream the answer to a file")
    src = ask.add_mutually_exclusive_group(required=True)
    src.add_argument("--audio", type=Path, help="the question as an audio file (WAV/FLAC/OGG, any rate)")
    src.add_argument("--text", help="the question as text")
    ask.add_argument("--out", type=Path, help="write the spoken answer here (WAV, written as it arrives)")
    ask.add_argument("--server", default="localhost:50051", help="service host:port")
    ask.add_argument("--session", default="", help="session id (multi-turn); see --new-session")
    ask.add_argument("--new-session", action="store_true", help="create a session first and print its id")
    ask.add_argument("--output", choices=["speech", "text"], default="speech")
    ask.add_argument("--voice", default="")
    ask.add_argument("--max-new-tokens", type=int)
    ask.add_argument("--temperature", type=float)
    ask.add_argument("--seed", type=int)
    ask.add_argument("--timeout", type=float, default=300.0, help="deadline of the call, seconds")
    ask.set_defaults(func=cmd_ask)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from pydantic import ValidationError

    from moss_speech.services.server import serve
    from moss_speech.services.settings import ServiceSettings

    flags = {"triton_url": args.triton_url, "grpc_port": args.port, "metrics_port": args.metrics_port,
             "log_level": args.log_level, "log_format": args.log_format, "drain_seconds": args.drain_seconds}
    try:
        settings = ServiceSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        print(f"moss-speech serve: bad settings:\n{e}", file=sys.stderr)
        return 2
    asyncio.run(serve(settings))
    return 0


def _requests(args: argparse.Namespace, pb, session_id: str):
    sampling = pb.Sampling()
    for name in ("max_new_tokens", "temperature", "seed"):
        if getattr(args, name) is not None:
            setattr(sampling, name, getattr(args, name))
    output = pb.OUTPUT_MODALITY_TEXT if args.output == "text" else pb.OUTPUT_MODALITY_SPEECH
    yield pb.StreamConverseRequest(config=pb.StreamConfig(
        session_id=session_id, output=output, voice=args.voice, sampling=sampling,
        input_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_CONTAINER)))
    if args.text is not None:
        yield pb.StreamConverseRequest(text=args.text)
    else:
        data = args.audio.read_bytes()
        for i in range(0, len(data), 64 * 1024):
            yield pb.StreamConverseRequest(audio=data[i:i + 64 * 1024])
    args._t_end_of_input = time.perf_counter()
    yield pb.StreamConverseRequest(end_of_turn=pb.EndOfTurn())


def cmd_ask(args: argparse.Namespace) -> int:
    import grpc
    import numpy as np
    import soundfile as sf

    from moss_speech.services.api import speech_pb2 as pb
    from moss_speech.services.api import speech_pb2_grpc

    if args.audio is not None and not args.audio.is_file():
        print(f"moss-speech ask: no such file {args.audio}", file=sys.stderr)
        return 2
    channel = grpc.insecure_channel(args.server)
    stub = speech_pb2_grpc.MossSpeechStub(channel)
    writer = None
    ttfa = None
    samples = 0
    try:
        session_id = args.session
        if args.new_session:
            session_id = stub.CreateSession(pb.CreateSessionRequest(), timeout=10).session_id
            print(f"session: {session_id}", file=sys.stderr)
        args._t_end_of_input = time.perf_counter()
        for msg in stub.StreamConverse(_requests(args, pb, session_id), timeout=args.timeout):
            kind = msg.WhichOneof("kind")
            if kind == "text":
                print(msg.text.text, end="", flush=True)
            elif kind == "audio":
                if ttfa is None:
                    ttfa = time.perf_counter() - args._t_end_of_input
                pcm = np.frombuffer(msg.audio.pcm16, dtype="<i2")
                samples += pcm.size
                rate = msg.audio.sample_rate
                if args.out is not None:
                    if writer is None:
                        writer = sf.SoundFile(args.out, "w", samplerate=rate, channels=1, subtype="PCM_16",
                                              format="WAV")
                    writer.write(pcm)
                    writer.flush()  # the file grows as the answer arrives
            elif kind == "final":
                wall = time.perf_counter() - args._t_end_of_input
                f = msg.final
                audio_s = samples / (rate if samples else 1)
                print()
                print(f"request id: {msg.request_id}", file=sys.stderr)
                if samples:
                    server_ttfa = f.timings.time_to_first_audio_ms
                    print(f"time to first audio: {1000 * ttfa:.0f} ms (server {server_ttfa:.0f} ms)"
                          f"; real-time factor: {wall / audio_s:.3f} ({audio_s:.2f} s of audio in {wall:.2f} s)",
                          file=sys.stderr)
                print(f"tokens: {f.usage.generated_tokens} generated, stop: {f.usage.stop_reason}"
                      + (f"; {f.usage.dropped_turns} old turn(s) dropped from the context"
                         if f.usage.context_truncated else ""), file=sys.stderr)
        if args.out is not None and writer is None:
            print("moss-speech ask: the answer had no audio; nothing written", file=sys.stderr)
        return 0
    except grpc.RpcError as e:
        print(f"moss-speech ask: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    finally:
        if writer is not None:
            writer.close()
        channel.close()
