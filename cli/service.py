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
    serve.add_argument("--bind", help="bind address of the gRPC port (MOSS_SPEECH_BIND_ADDRESS)")
    serve.add_argument(
        "--plaintext",
        action="store_true",
        default=None,
        help="no TLS on the gRPC port (MOSS_SPEECH_PLAINTEXT); loopback/trusted networks only",
    )
    serve.add_argument("--tls-cert", help="PEM certificate chain (MOSS_SPEECH_TLS_CERT_FILE)")
    serve.add_argument("--tls-key", help="PEM private key (MOSS_SPEECH_TLS_KEY_FILE)")
    serve.add_argument(
        "--tls-client-ca", help="require client certificates signed by this CA: mTLS (MOSS_SPEECH_TLS_CLIENT_CA_FILE)"
    )
    serve.add_argument("--auth", choices=["api_keys", "none"], help="API key check (MOSS_SPEECH_AUTH)")
    serve.add_argument("--api-keys-file", help="key hashes, `key_id:sha256hex` lines (MOSS_SPEECH_API_KEYS_FILE)")
    serve.add_argument(
        "--reflection", action="store_true", default=None, help="serve gRPC reflection (MOSS_SPEECH_REFLECTION)"
    )
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
    ask.add_argument("--plaintext", action="store_true", help="connect without TLS (local stacks)")
    ask.add_argument("--ca", type=Path, help="PEM CA that signed the server certificate (default: system roots)")
    ask.add_argument("--cert", type=Path, help="client certificate for mTLS (PEM)")
    ask.add_argument("--key", type=Path, help="client key for mTLS (PEM)")
    ask.add_argument(
        "--api-key-env",
        default="MOSS_SPEECH_API_KEY",
        help="environment variable holding the API key (default MOSS_SPEECH_API_KEY)",
    )
    ask.set_defaults(func=cmd_ask)


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from pydantic import ValidationError

    from moss_speech.services.auth import KeyFileError
    from moss_speech.services.server import serve
    from moss_speech.services.settings import ServiceSettings
    from moss_speech.services.tls import TlsConfigError

    flags = {
        "triton_url": args.triton_url,
        "grpc_port": args.port,
        "metrics_port": args.metrics_port,
        "log_level": args.log_level,
        "log_format": args.log_format,
        "drain_seconds": args.drain_seconds,
        "bind_address": args.bind,
        "plaintext": args.plaintext,
        "tls_cert_file": args.tls_cert,
        "tls_key_file": args.tls_key,
        "tls_client_ca_file": args.tls_client_ca,
        "auth": args.auth,
        "api_keys_file": args.api_keys_file,
        "reflection": args.reflection,
    }
    try:
        settings = ServiceSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        print(f"moss-speech serve: bad settings:\n{e}", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings))
    except (TlsConfigError, KeyFileError) as e:
        print(
            f"moss-speech serve: {e}\n(plaintext without keys needs MOSS_SPEECH_PLAINTEXT=true and "
            "MOSS_SPEECH_AUTH=none, for loopback only; see docs/security.md)",
            file=sys.stderr,
        )
        return 2
    return 0


def client_channel(args: argparse.Namespace):
    """A channel to the service: TLS (optionally with a client certificate for mTLS) unless --plaintext."""
    import grpc

    if args.plaintext:
        return grpc.insecure_channel(args.server)
    creds = grpc.ssl_channel_credentials(
        root_certificates=args.ca.read_bytes() if args.ca else None,
        private_key=args.key.read_bytes() if args.key else None,
        certificate_chain=args.cert.read_bytes() if args.cert else None,
    )
    return grpc.secure_channel(args.server, creds)


def auth_metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    """`authorization: Bearer <key>` from the environment variable --api-key-env (never a command-line flag:
    arguments are visible to every user of the machine)."""
    import os

    key = os.environ.get(args.api_key_env, "")
    return (("authorization", f"Bearer {key}"),) if key else ()


def _requests(args: argparse.Namespace, pb, session_id: str):
    sampling = pb.Sampling()
    for name in ("max_new_tokens", "temperature", "seed"):
        if getattr(args, name) is not None:
            setattr(sampling, name, getattr(args, name))
    output = pb.OUTPUT_MODALITY_TEXT if args.output == "text" else pb.OUTPUT_MODALITY_SPEECH
    yield pb.StreamConverseRequest(
        config=pb.StreamConfig(
            session_id=session_id,
            output=output,
            voice=args.voice,
            sampling=sampling,
            input_format=pb.AudioFormat(encoding=pb.AUDIO_ENCODING_CONTAINER),
        )
    )
    if args.text is not None:
        yield pb.StreamConverseRequest(text=args.text)
    else:
        data = args.audio.read_bytes()
        for i in range(0, len(data), 64 * 1024):
            yield pb.StreamConverseRequest(audio=data[i : i + 64 * 1024])
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
    channel = client_channel(args)
    stub = speech_pb2_grpc.MossSpeechStub(channel)
    writer = None
    ttfa = None
    samples = 0
    try:
        session_id = args.session
        if args.new_session:
            session_id = stub.CreateSession(
                pb.CreateSessionRequest(), timeout=10, metadata=auth_metadata(args)
            ).session_id
            print(f"session: {session_id}", file=sys.stderr)
        args._t_end_of_input = time.perf_counter()
        for msg in stub.StreamConverse(
            _requests(args, pb, session_id), timeout=args.timeout, metadata=auth_metadata(args)
        ):
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
                        writer = sf.SoundFile(
                            args.out, "w", samplerate=rate, channels=1, subtype="PCM_16", format="WAV"
                        )
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
                    print(
                        f"time to first audio: {1000 * ttfa:.0f} ms (server {server_ttfa:.0f} ms)"
                        f"; real-time factor: {wall / audio_s:.3f} ({audio_s:.2f} s of audio in {wall:.2f} s)",
                        file=sys.stderr,
                    )
                print(
                    f"tokens: {f.usage.generated_tokens} generated, stop: {f.usage.stop_reason}"
                    + (
                        f"; {f.usage.dropped_turns} old turn(s) dropped from the context"
                        if f.usage.context_truncated
                        else ""
                    ),
                    file=sys.stderr,
                )
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
