"""`moss-speech demo`: the whole served pipeline on a laptop, end to end.

tiny checkpoint -> `moss-speech build --target cpu` -> a real tritonserver -> the gRPC service -> a spoken
question (espeak-ng) -> `moss-speech ask` streams the answer into answer.wav and prints TTFA and RTF.
The tiny checkpoint has random weights: the answer is well-formed speech-token audio, not an answer.
Point `--checkpoint/--codec` at the real fnlp/MOSS-Speech and fnlp/MOSS-Speech-Codec directories to serve them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

QUESTION = "What is the tallest mountain in the world?"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="tiny checkpoint -> build -> tritonserver -> service -> spoken answer.wav")
    p.add_argument("--work", type=Path, default=Path("demo-out"), help="working directory (reused when rerun)")
    p.add_argument("--checkpoint", type=Path, default=None, help="MOSS-Speech checkpoint (default: a tiny one)")
    p.add_argument("--codec", type=Path, default=None, help="MOSS-Speech-Codec directory (default: the tiny one)")
    p.add_argument("--question", default=QUESTION, help="spoken with espeak-ng")
    p.add_argument("--max-new-tokens", type=int, default=75, help="answer length in steps (75 = 6 s of speech)")
    p.set_defaults(func=cmd_demo)


def speak(text: str, out: Path) -> None:
    """A 16 kHz mono WAV of `text` from espeak-ng (sox resamples)."""
    if not (shutil.which("espeak-ng") and shutil.which("sox")):
        raise SystemExit("moss-speech demo: needs espeak-ng and sox (./dev.sh setup installs them)")
    speech = subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "140", "--stdout", text], check=True, capture_output=True
    ).stdout
    subprocess.run(["sox", "-t", "wav", "-", "-r", "16000", "-c", "1", "-b", "16", str(out)], input=speech, check=True)


def wait_serving(address: str, timeout: float = 120.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise SystemExit(f"moss-speech demo: the service at {address} did not become SERVING in {timeout:.0f} s")


def cmd_demo(args: argparse.Namespace) -> int:
    from moss_speech.cli.up import cpu_repository, local_checkpoint, local_triton

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    fresh: list[Path] = []

    def writing(path: Path) -> None:
        fresh.append(path)
        print(f"[1/5] tiny random checkpoint + codec in the real layouts -> {path}")

    checkpoint, codec = local_checkpoint(work, args.checkpoint, args.codec, "demo", writing)
    if args.checkpoint is None and not fresh:
        print(f"[1/5] tiny checkpoint already in {checkpoint}")

    print(f"[2/5] building the CPU model repository -> {work / 'repo'}")
    repo = cpu_repository(work, checkpoint, codec)

    question = work / "question.wav"
    print(f"[3/5] speaking the question with espeak-ng: {args.question!r} -> {question}")
    speak(args.question, question)

    print(
        "[4/5] starting tritonserver and the gRPC service (on 127.0.0.1 only, plaintext, no API keys: a local "
        "demo; deployments use TLS and keys, docs/security.md)"
    )
    from moss_speech.model_repository.launcher import free_port

    port, metrics_port = free_port(), free_port()
    with local_triton(repo, work) as triton:
        env = os.environ | {
            "MOSS_SPEECH_TRITON_URL": triton.grpc_url,
            "MOSS_SPEECH_GRPC_PORT": str(port),
            "MOSS_SPEECH_METRICS_PORT": str(metrics_port),
            "MOSS_SPEECH_BIND_ADDRESS": "127.0.0.1",
            "MOSS_SPEECH_METRICS_BIND_ADDRESS": "127.0.0.1",
            "MOSS_SPEECH_PLAINTEXT": "true",
            "MOSS_SPEECH_AUTH": "none",
        }
        with open(work / "service.log", "w") as log:
            service = subprocess.Popen(
                [sys.executable, "-m", "moss_speech.cli.main", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            wait_serving(f"127.0.0.1:{port}")
            print(
                f"      tritonserver grpc {triton.grpc_url}, service 127.0.0.1:{port}, "
                f"metrics http://127.0.0.1:{metrics_port}/metrics (logs in {work})"
            )
            answer = work / "answer.wav"
            print(f"[5/5] asking over gRPC (StreamConverse), streaming the spoken answer -> {answer}")
            rc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "moss_speech.cli.main",
                    "ask",
                    "--audio",
                    str(question),
                    "--out",
                    str(answer),
                    "--server",
                    f"127.0.0.1:{port}",
                    "--plaintext",
                    "--max-new-tokens",
                    str(args.max_new_tokens),
                ],
                check=False,
            ).returncode
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(60)
    if rc == 0:
        print(
            f"\nanswer: {answer}\nThe tiny checkpoint has random weights, so the answer is speech-shaped noise;"
            " serve the real checkpoints with --checkpoint DIR --codec DIR (see README)."
        )
    return rc
