"""Service benchmark: time to first audio through the service vs calling Triton directly, then a soak of N
concurrent streams (errors, RSS growth of the service process).

    python bench/service_bench.py [--duration 120] [--concurrency 4] [--repeats 15] [--triton-url host:port]

Without --triton-url it builds the tiny repository (tiny checkpoint → build_repository) and starts a local
tritonserver. The service runs as a `moss-speech serve` subprocess (its RSS is read from /proc). "Direct" uses
the service's own Triton client (tritonclient.grpc.aio) in this process, with the same inputs, so the difference
is what the service adds: the extra gRPC hop, validation, session handling, PCM16 conversion.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table  # noqa: E402

from moss_speech.contract.sampling import SamplingParams  # noqa: E402
from moss_speech.model_repository.launcher import TritonServer, free_port  # noqa: E402
from moss_speech.services.api import speech_pb2 as pb  # noqa: E402
from moss_speech.services.api import speech_pb2_grpc  # noqa: E402
from moss_speech.services.triton_client import TritonClient, TurnInput  # noqa: E402

MODELS = ["speech_encoder", "llm", "vocoder", "s2s", "t2s"]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def build_tiny(root: Path) -> Path:
    from moss_speech.builders.export.build import build_repository
    from moss_speech.builders.tiny import write_tiny_bundle
    from moss_speech.contract.serving import ServingConfig

    write_tiny_bundle(root / "ckpt", seed=0)
    serving = ServingConfig.for_target("cpu", max_context=1024, max_slots=8, vocoder_instances=1)
    build_repository(
        root / "ckpt", root / "ckpt" / "codec", target="cpu", out=root / "repo", serving=serving, progress=False
    )
    return root / "repo"


def sampling(tokens: int) -> dict:
    return {"do_sample": False, "repetition_penalty": 1.0, "max_new_tokens": tokens, "min_new_tokens": tokens}


async def ttfa_direct(client: TritonClient, text: str, tokens: int) -> float:
    turn = TurnInput(
        request_id=os.urandom(8).hex(),
        history=np.zeros((0, 2), np.int64),
        output="speech",
        sampling=SamplingParams(**sampling(tokens)),
        voice="default",
        text=text,
    )
    t0 = time.perf_counter()
    first = None
    async for chunk in client.generate(turn, timeout=60):
        if first is None and chunk.audio is not None:
            first = time.perf_counter() - t0
    return first


async def ttfa_service(stub, text: str, tokens: int) -> float:
    s = sampling(tokens)
    cfg = pb.StreamConfig(
        output=pb.OUTPUT_MODALITY_SPEECH,
        sampling=pb.Sampling(
            do_sample=False,
            repetition_penalty=1.0,
            max_new_tokens=s["max_new_tokens"],
            min_new_tokens=s["min_new_tokens"],
        ),
    )
    msgs = [
        pb.StreamConverseRequest(config=cfg),
        pb.StreamConverseRequest(text=text),
        pb.StreamConverseRequest(end_of_turn=pb.EndOfTurn()),
    ]
    t0 = time.perf_counter()
    first = None
    async for r in stub.StreamConverse(iter(msgs), timeout=60):
        if first is None and r.WhichOneof("kind") == "audio":
            first = time.perf_counter() - t0
    return first


async def soak(stub, concurrency: int, duration: float, tokens: int, pid: int) -> dict:
    errors: list[str] = []
    turns = [0] * concurrency
    ttfas: list[float] = []
    stop_at = time.monotonic() + duration

    async def worker(i: int) -> None:
        while time.monotonic() < stop_at:
            sid = (await stub.CreateSession(pb.CreateSessionRequest(), timeout=10)).session_id
            cfg = pb.StreamConfig(
                session_id=sid, output=pb.OUTPUT_MODALITY_SPEECH, sampling=pb.Sampling(max_new_tokens=tokens, seed=i)
            )
            queue: asyncio.Queue = asyncio.Queue()

            async def requests(cfg=cfg, queue=queue):
                yield pb.StreamConverseRequest(config=cfg)
                for k in range(3):  # three turns per stream, each sent after the previous answer
                    yield pb.StreamConverseRequest(text=f"worker {i} turn {k}: tell me something")
                    yield pb.StreamConverseRequest(end_of_turn=pb.EndOfTurn())
                    await queue.get()

            try:
                async for r in stub.StreamConverse(requests(), timeout=120):
                    if r.WhichOneof("kind") == "final":
                        turns[i] += 1
                        if r.final.timings.time_to_first_audio_ms:
                            ttfas.append(r.final.timings.time_to_first_audio_ms)
                        queue.put_nowait(None)
                await stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), timeout=10)
            except grpc.aio.AioRpcError as e:
                errors.append(f"{e.code().name}: {e.details()}")

    rss = [rss_mb(pid)]
    sampler_stop = asyncio.Event()

    async def sampler():
        while not sampler_stop.is_set():
            await asyncio.sleep(5)
            rss.append(rss_mb(pid))

    task = asyncio.create_task(sampler())
    t0 = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    wall = time.monotonic() - t0
    sampler_stop.set()
    await task
    rss.append(rss_mb(pid))
    return {"errors": errors, "turns": sum(turns), "wall": wall, "rss": rss, "ttfa_ms": ttfas}


class OtlpSink:
    """Accepts OTLP/HTTP exports and drops them: a stand-in collector for the tracing-overhead comparison."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


async def tracing_overhead(stub, traced_stub, text: str, tokens: int, repeats: int) -> dict[str, list[float]]:
    """TTFA through a service without and with tracing (same Triton, traced by it too), interleaved pairs."""
    for _ in range(3):
        await ttfa_service(traced_stub, text, tokens)
    off, on = [], []
    for i in range(repeats):
        order = [(stub, off), (traced_stub, on)]
        for s, out in order if i % 2 == 0 else order[::-1]:  # alternate which goes first
            out.append(await ttfa_service(s, text, tokens))
    paired = [b - a for a, b in zip(off, on, strict=True)]
    mo, mp = statistics.median(off), statistics.median(paired)
    print_table(
        f"tracing overhead on time to first audio, {repeats} interleaved pairs, same Triton",
        [
            ("service, tracing off (median)", f"{1000 * mo:.1f} ms"),
            ("service, tracing on (median)", f"{1000 * statistics.median(on):.1f} ms"),
            (
                "added by tracing, median of paired differences",
                f"{1000 * mp:+.2f} ms = {100 * mp / mo:+.2f} % (goal <= 2 %)",
            ),
        ],
    )
    return {"off": [1000 * x for x in off], "on": [1000 * x for x in on]}


async def main_async(
    args: argparse.Namespace, triton_url: str, pid: int, address: str, traced_address: str | None = None
) -> None:
    client = TritonClient(triton_url)
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), 60)  # the service subprocess is starting
        stub = speech_pb2_grpc.MossSpeechStub(channel)
        text = "how is the weather today"
        for _ in range(3):  # warm both paths (imports, model configs, onnx sessions)
            await ttfa_direct(client, text, args.tokens)
            await ttfa_service(stub, text, args.tokens)
        direct, service, paired = [], [], []
        for _ in range(args.repeats):  # interleaved so drift hits both alike
            d = await ttfa_direct(client, text, args.tokens)
            s = await ttfa_service(stub, text, args.tokens)
            direct.append(d)
            service.append(s)
            paired.append(s - d)
        md, ms = statistics.median(direct), statistics.median(service)
        traced = None
        if traced_address:
            async with grpc.aio.insecure_channel(traced_address) as traced_channel:
                await asyncio.wait_for(traced_channel.channel_ready(), 60)
                traced = await tracing_overhead(
                    stub, speech_pb2_grpc.MossSpeechStub(traced_channel), text, args.tokens, args.repeats
                )
        print_table(
            f"time to first audio, t2s speech out, greedy, {args.tokens} tokens, {args.repeats} pairs",
            [
                ("direct Triton (median)", f"{1000 * md:.1f} ms"),
                ("through the service (median)", f"{1000 * ms:.1f} ms"),
                ("added by the service (median of medians)", f"{1000 * (ms - md):+.1f} ms"),
                ("added, median of paired differences", f"{1000 * statistics.median(paired):+.1f} ms"),
            ],
        )
        rss0 = rss_mb(pid)
        result = await soak(stub, args.concurrency, args.duration, args.soak_tokens, pid)
        rss_start, rss_end = result["rss"][0], result["rss"][-1]
        ttfa = sorted(result["ttfa_ms"]) or [0.0]
        print_table(
            f"soak: {args.concurrency} concurrent streams, {args.duration:.0f} s, "
            f"{args.soak_tokens} tokens per turn, 3 turns per session stream",
            [
                ("turns completed", str(result["turns"])),
                ("errors", str(len(result["errors"]))),
                ("service TTFA p50 / p90", f"{ttfa[len(ttfa) // 2]:.0f} / {ttfa[int(len(ttfa) * 0.9)]:.0f} ms"),
                ("service RSS before soak", f"{rss0:.1f} MiB"),
                ("service RSS after soak", f"{rss_end:.1f} MiB"),
                ("RSS growth", f"{100 * (rss_end - rss_start) / rss_start:+.1f} % (max {max(result['rss']):.1f} MiB)"),
            ],
        )
        for e in result["errors"][:5]:
            print("  error:", e)
        if not args.no_plots:
            from plots import FIGURES, distribution_plot

            series = {"Triton directly": [1000 * x for x in direct], "through the service": [1000 * x for x in service]}
            if traced:
                series["service, tracing on"] = traced["on"]
            series[f"soak, {args.concurrency} streams"] = result["ttfa_ms"]
            print(
                "plots:",
                distribution_plot(
                    FIGURES / "service_ttfa_distribution.png",
                    "Time to first audio through the service (tiny model, CPU)",
                    series,
                    "time to first audio (ms)",
                ),
            )
    await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120.0, help="soak length, seconds")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=15, help="TTFA pairs")
    parser.add_argument("--tokens", type=int, default=12, help="tokens per TTFA request")
    parser.add_argument("--soak-tokens", type=int, default=40, help="tokens per soak turn")
    parser.add_argument("--triton-url", help="use a running Triton instead of building the tiny repository")
    parser.add_argument(
        "--tracing-overhead",
        action="store_true",
        help="also compare TTFA with tracing on (Triton traced too) vs off; needs the tracing extra",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG in docs/figures/")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        triton = None
        sink = OtlpSink() if args.tracing_overhead else None  # with --triton-url: only the service traced
        if args.triton_url is None:
            print("building the tiny repository and starting tritonserver ...", flush=True)
            repo = build_tiny(Path(tmp))
            triton = TritonServer(
                repo,
                http_port=None,
                grpc_port=None,
                metrics_port=None,
                model_control_mode="explicit",
                load_models=MODELS,
                ready_timeout=300,
                trace_otlp_url=sink.url if sink else None,
                log_stream=open(Path(tmp) / "triton.log", "w"),
            )  # noqa: SIM115
            triton.start()
        triton_url = args.triton_url or triton.grpc_url
        port = free_port()
        env = {
            **os.environ,
            "MOSS_SPEECH_TRITON_URL": triton_url,
            "MOSS_SPEECH_GRPC_PORT": str(port),
            "MOSS_SPEECH_METRICS_PORT": str(free_port()),
            "MOSS_SPEECH_LOG_LEVEL": "WARNING",
            "MOSS_SPEECH_PLAINTEXT": "true",
            "MOSS_SPEECH_AUTH": "none",
        }  # loopback bench: explicitly open
        service = subprocess.Popen([sys.executable, "-m", "moss_speech.cli.main", "serve"], env=env)
        traced, traced_address = None, None
        if args.tracing_overhead:
            traced_port = free_port()
            traced_address = f"localhost:{traced_port}"
            traced = subprocess.Popen(
                [sys.executable, "-m", "moss_speech.cli.main", "serve"],
                env={
                    **env,
                    "MOSS_SPEECH_GRPC_PORT": str(traced_port),
                    "MOSS_SPEECH_METRICS_PORT": str(free_port()),
                    "MOSS_SPEECH_OTLP_ENDPOINT": sink.url,
                },
            )
        try:
            asyncio.run(main_async(args, triton_url, service.pid, f"localhost:{port}", traced_address))
        finally:
            for proc in (service, traced):
                if proc is not None:
                    proc.terminate()
                    proc.wait(30)
            if triton is not None:
                triton.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
