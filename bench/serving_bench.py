"""Serving figures, tiny model on CPU, all in one run:

- time to first audio (TTFA) and real-time factor (RTF) through a real tritonserver vs the same pipeline
  in process (same onnxruntime graphs: encoder -> continuous-batching engine -> vocoder windows);
- throughput at concurrency 1, 2, 4 (seconds of speech produced per wall second);
- optionally the perf_analyzer command against the streaming ensemble (--perf-analyzer).

    .venv/bin/python bench/serving_bench.py [--work DIR] [--requests 6] [--max-new-tokens 40]
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from harness import print_table  # noqa: E402

from moss_speech.builders.export.build import LLM_ARTIFACTS, build_repository, codec_graphs_dir  # noqa: E402
from moss_speech.builders.llm.generate import SamplingParams  # noqa: E402
from moss_speech.builders.llm.prompt import PromptBuilder, Turn  # noqa: E402
from moss_speech.contract.serving import ServingConfig  # noqa: E402
from moss_speech.model_repository.launcher import TritonServer  # noqa: E402
from moss_speech.model_repository.runtime.factory import load_codec_runtime, load_llm_runtime  # noqa: E402
from moss_speech.model_repository.runtime.scheduler import Engine, Request  # noqa: E402

SAMPLE_RATE_OUT = 24000


def question(seconds: float = 2.0) -> np.ndarray:
    t = np.arange(int(16000 * seconds), dtype=np.float32) / 16000
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 4 * t))).astype(np.float32)


def sampling(n: int) -> str:
    return json.dumps({"do_sample": False, "repetition_penalty": 1.0, "max_new_tokens": n})


def prepare(work: Path) -> tuple[Path, Path]:
    from moss_speech.builders.tiny import write_tiny_bundle

    tiny, repo = work / "tiny", work / "repo"
    if not (tiny / "config.json").exists():
        write_tiny_bundle(tiny)
    build_repository(tiny, tiny / "codec", "cpu", repo, ServingConfig.for_target("cpu"), progress=False)
    return tiny, repo


def in_process(tiny: Path, repo: Path, audio: np.ndarray, max_new: int, repeats: int) -> list[dict]:
    """The same stages, one process, nothing between them: the floor a server is measured against."""
    serving = ServingConfig.model_validate(json.loads((repo / "manifest.json").read_text())["serving"])
    codec = load_codec_runtime(serving, tiny / "codec", codec_graphs_dir(repo))
    runtime = load_llm_runtime(serving, tiny, repo / LLM_ARTIFACTS / "model.onnx")
    engine = Engine(runtime, PromptBuilder.from_dir(tiny, runtime.config), serving.streaming())
    out = []
    for i in range(repeats + 1):  # the first run warms up
        t0 = time.perf_counter()
        codes = codec.encode_pcm([audio])[0].tolist()
        updates: list = []
        engine.submit(
            Request(
                f"p{i}",
                Turn("user", codes=codes),
                "speech",
                params=SamplingParams.model_validate_json(sampling(max_new)),
            ),
            updates.append,
        )
        first, samples, seen = None, 0, 0
        while not (updates and updates[-1].final) or seen < len(updates):
            if seen == len(updates):
                engine.step()
                continue
            for w in updates[seen].windows:
                samples += codec.decode_windows([w])[0].size
                first = first or time.perf_counter() - t0
            seen += 1
        wall = time.perf_counter() - t0
        if i:
            out.append({"ttfa": first, "rtf": wall / (samples / SAMPLE_RATE_OUT), "audio_s": samples / SAMPLE_RATE_OUT})
    return out


def served_turn(url: str, audio: np.ndarray, max_new: int) -> dict:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    events: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    a = grpcclient.InferInput("AUDIO", [1, audio.size], "FP32")
    a.set_data_from_numpy(audio[None])
    s = grpcclient.InferInput("SAMPLING", [1, 1], "BYTES")
    s.set_data_from_numpy(np.array([[sampling(max_new).encode()]], dtype=object))
    t0 = time.perf_counter()
    client.async_stream_infer("s2s", [a, s], enable_empty_final_response=True)
    first, samples = None, 0
    while True:
        result, error = events.get(timeout=300)
        if error is not None:
            raise RuntimeError(error)
        response = result.get_response()
        if response.outputs:
            n = result.as_numpy("AUDIO_CHUNK").size
            if n and first is None:
                first = time.perf_counter() - t0
            samples += n
        if response.parameters["triton_final_response"].bool_param:
            break
    wall = time.perf_counter() - t0
    client.stop_stream()
    client.close()
    return {
        "ttfa": first,
        "rtf": wall / (samples / SAMPLE_RATE_OUT),
        "audio_s": samples / SAMPLE_RATE_OUT,
        "wall": wall,
    }


def throughput(
    url: str, audio: np.ndarray, max_new: int, concurrency: int, requests: int, ttfas: list[float] | None = None
) -> float:
    """Seconds of speech produced per wall-clock second with `concurrency` clients (TTFA of each turn, in ms,
    appended to `ttfas`)."""
    jobs: queue.Queue = queue.Queue()
    for _ in range(requests):
        jobs.put(None)
    produced: list[float] = []

    def client():
        while True:
            try:
                jobs.get_nowait()
            except queue.Empty:
                return
            turn = served_turn(url, audio, max_new)
            produced.append(turn["audio_s"])
            if ttfas is not None:
                ttfas.append(1000 * turn["ttfa"])

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(produced) / (time.perf_counter() - t0)


def perf_analyzer(url: str, work: Path, audio: np.ndarray, max_new: int) -> str:
    """perf_analyzer streaming against the s2s ensemble; returns the command and its report."""
    from perf_analyzer import run_perf_analyzer, stream_latencies_ms

    data = work / "s2s_input.json"
    data.write_text(
        json.dumps(
            {
                "data": [
                    {
                        "AUDIO": {"content": audio.tolist(), "shape": [audio.size]},
                        "SAMPLING": [sampling(max_new)],
                    }
                ]
            }
        )
    )
    profile = work / "s2s_profile.json"
    args = [
        "-m",
        "s2s",
        "-u",
        url,
        "-i",
        "grpc",
        "--streaming",
        f"--input-data={data}",
        "--concurrency-range=1:4",
        "--measurement-interval=8000",
        "--stability-percentage=50",
        f"--profile-export-file={profile}",
    ]
    out = run_perf_analyzer(args)
    report = out.stdout + out.stderr
    if profile.exists():
        lat = stream_latencies_ms(profile)
        first, last = sorted(lat["first"]), sorted(lat["last"])
        report += (
            f"\nprofile export: {len(first)} streams, first response p50 {first[len(first) // 2]:.0f} ms, "
            f"last response p50 {last[len(last) // 2]:.0f} ms\n"
        )
    return "perf_analyzer " + " ".join(args) + "\n" + report


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--requests", type=int, default=6, help="requests per measurement")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--perf-analyzer", action="store_true", help="also run perf_analyzer against s2s")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNGs in docs/figures/")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="serving-bench-"))
    tiny, repo = prepare(work)
    audio = question()
    local = in_process(tiny, repo, audio, args.max_new_tokens, args.requests)
    with TritonServer(repo, http_port=None, grpc_port=None, metrics_port=None, ready_timeout=600) as srv:
        served_turn(srv.grpc_url, audio, args.max_new_tokens)  # warm up
        served = [served_turn(srv.grpc_url, audio, args.max_new_tokens) for _ in range(args.requests)]
        ttfa_by_c: dict[int, list[float]] = {c: [] for c in (1, 2, 4)}
        tput = {
            c: throughput(srv.grpc_url, audio, args.max_new_tokens, c, args.requests * c // 2 + 2, ttfa_by_c[c])
            for c in (1, 2, 4)
        }
        pa = perf_analyzer(srv.grpc_url, work, audio, args.max_new_tokens) if args.perf_analyzer else None
    print_table(
        f"time to first audio and RTF (tiny model, CPU, {args.max_new_tokens} speech tokens, medians of "
        f"{args.requests})",
        [
            ("in-process TTFA", f"{med(local, 'ttfa') * 1e3:.0f} ms"),
            ("served TTFA (Triton s2s)", f"{med(served, 'ttfa') * 1e3:.0f} ms"),
            ("served / in-process TTFA", f"{med(served, 'ttfa') / med(local, 'ttfa'):.2f}x (goal <= 1.25x)"),
            ("in-process RTF", f"{med(local, 'rtf'):.3f}"),
            ("served RTF", f"{med(served, 'rtf'):.3f}"),
        ],
    )
    print_table(
        "throughput through Triton (speech seconds per wall second)",
        [(f"concurrency {c}", f"{v:.2f}  ({v / tput[1]:.2f}x c=1)") for c, v in tput.items()]
        + [("goal", "c=4 >= 1.5x c=1")],
    )
    if pa:
        print("\n## perf_analyzer against the streaming ensemble\n" + pa)
    if not args.no_plots:
        from plots import FIGURES, concurrency_plot, distribution_plot

        print(
            "plots:",
            concurrency_plot(
                FIGURES / "serving_concurrency.png",
                f"Triton s2s, tiny model on CPU, {args.max_new_tokens} speech tokens per turn",
                ttfa_by_c,
                tput,
                "speech seconds per wall second",
            ),
        )
        print(
            "plots:",
            distribution_plot(
                FIGURES / "serving_ttfa_distribution.png",
                "Time to first audio: in-process vs served (Triton s2s)",
                {
                    "in-process": [1000 * r["ttfa"] for r in local],
                    "served, c=1": [1000 * r["ttfa"] for r in served],
                    "served, c=4": ttfa_by_c[4],
                },
                "time to first audio (ms)",
            ),
        )


if __name__ == "__main__":
    main()
