"""Scale-out figures on loopback, all real processes: two tritonservers (a CPU repository built here with
max_context 2048), gRPC service replicas, a redis-server.

1. spread: sessionless turns at c=8 through one service over both Tritons; requests per Triton replica (from each
   server's `nv_inference_request_success` for llm) vs an even split.
2. prefix hit vs miss at a ~1,000-row history, same run: services A (Triton 1 only) and B (Triton 2 only) share
   one Redis, so a session built through A is cached on Triton 1 only. The next turn through A is a hit; the
   same session's next turn through B is a miss (Triton 2 never saw it). Prefill cost = time to first text of
   the turn minus that of a zero-history turn on the same Triton (same question, same length), i.e. what the
   history added; reported as hit cost / miss cost.
3. store latency: the same short turn, alternating between a memory-store service and a Redis-store service on
   the same Triton; the median difference is the Redis store's added latency per turn.

    python bench/scaleout_bench.py [--turns 32] [--sessions 3] [--rows 1000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests" / "service"), str(REPO / "tests"), str(REPO)]

from service_support import ServiceProcess, start_triton  # noqa: E402
from tritonharness import metric  # noqa: E402

from moss_speech.services.api import speech_pb2 as pb  # noqa: E402
from moss_speech.services.api import speech_pb2_grpc  # noqa: E402
from tests.scaleout.redis_support import RedisServer  # noqa: E402

TEXT = pb.OUTPUT_MODALITY_TEXT
LONG = "tell me everything about the weather in the mountains in spring " * 6


def build_repo(tmp: Path, max_context: int) -> Path:
    from moss_speech.builders.export.build import build_repository
    from moss_speech.builders.tiny import write_tiny_bundle
    from moss_speech.contract.serving import ServingConfig

    bundle = tmp / "bundle"
    write_tiny_bundle(bundle, seed=0)
    out = tmp / "repo"
    build_repository(
        bundle,
        bundle / "codec",
        "cpu",
        out,
        ServingConfig.for_target("cpu", max_slots=4, max_context=max_context),
        progress=False,
    )
    return out


def converse(service, text: str, session_id: str = "", new_tokens: int = 4) -> pb.ConverseResponse:
    stub = speech_pb2_grpc.MossSpeechStub(grpc.insecure_channel(service.address))
    return stub.Converse(
        pb.ConverseRequest(
            session_id=session_id,
            text=text,
            output=TEXT,
            sampling=pb.Sampling(max_new_tokens=new_tokens, temperature=0.0),
        ),
        timeout=600,
    )


def new_session(service) -> str:
    stub = speech_pb2_grpc.MossSpeechStub(grpc.insecure_channel(service.address))
    return stub.CreateSession(pb.CreateSessionRequest()).session_id


def llm_requests(triton) -> float:
    return metric(triton.metrics(), "nv_inference_request_success", model="llm") or 0.0


def spread(service, tritons, turns: int) -> dict:
    before = [llm_requests(t) for t in tritons]
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda i: converse(service, f"question number {i}"), range(turns)))
    counts = [llm_requests(t) - b for t, b in zip(tritons, before, strict=True)]
    even = sum(counts) / len(counts)
    return {"per_replica": counts, "max_deviation_from_even": max(abs(c - even) for c in counts) / even}


def ttft(resp: pb.ConverseResponse) -> float:
    return resp.timings.time_to_first_text_ms


def prefix(a, b, sessions: int, rows: int) -> dict:
    hits, misses, base_a, base_b, hist = [], [], [], [], []
    for _ in range(sessions):
        sid = new_session(a)
        r = converse(a, LONG, sid)
        while r.usage.history_tokens < rows:  # grow the history through A (Triton 1) until a turn carries `rows`
            r = converse(a, LONG, sid)
        q = "and what about tomorrow?"
        base_a.append(ttft(converse(a, q)))  # zero history, Triton 1
        hit = converse(a, q, sid)  # Triton 1 holds the prefix
        base_b.append(ttft(converse(b, q)))  # zero history, Triton 2
        miss = converse(b, q, sid)  # Triton 2 never saw this session
        hits.append(ttft(hit))
        misses.append(ttft(miss))
        hist.append(int(miss.usage.history_tokens))
    hit_cost = statistics.median(h - z for h, z in zip(hits, base_a, strict=True))
    miss_cost = statistics.median(m - z for m, z in zip(misses, base_b, strict=True))
    return {
        "history_rows": hist,
        "ttft_hit_ms": hits,
        "ttft_miss_ms": misses,
        "ttft_zero_history_ms": base_a + base_b,
        "prefill_cost_hit_ms": hit_cost,
        "prefill_cost_miss_ms": miss_cost,
        "hit_over_miss": hit_cost / miss_cost if miss_cost > 0 else float("nan"),
    }


def store_latency(mem, red, turns: int) -> dict:
    t_mem, t_red = [], []
    for i in range(turns):
        for svc, out in ((mem, t_mem), (red, t_red)) if i % 2 == 0 else ((red, t_red), (mem, t_mem)):
            sid = new_session(svc)  # its creation is outside the timed turn
            t0 = time.perf_counter()
            converse(svc, "hi", sid, new_tokens=1)
            out.append((time.perf_counter() - t0) * 1000)
    return {
        "memory_median_ms": statistics.median(t_mem),
        "redis_median_ms": statistics.median(t_red),
        "redis_added_ms": statistics.median(t_red) - statistics.median(t_mem),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--turns", type=int, default=32)
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--rows", type=int, default=1000)
    ap.add_argument("--store-turns", type=int, default=40)
    ap.add_argument("--parts", default="spread,prefix,store", help="which measurements to run (comma list)")
    ap.add_argument("--spread-rounds", type=int, default=1, help="repeat the c=8 spread measurement")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="scaleout-bench-"))
    t0 = time.perf_counter()
    repo = build_repo(tmp, max_context=2048)
    print(f"repository built in {time.perf_counter() - t0:.0f} s", flush=True)
    redis = RedisServer(tmp / "redis").start()
    with ThreadPoolExecutor(2) as ex:
        tritons = list(ex.map(lambda _: start_triton(repo), range(2)))
    both = ",".join(f"127.0.0.1:{t.grpc_port}" for t in tritons)
    limits = {"MOSS_SPEECH_MAX_CONTEXT_TOKENS": "2048", "MOSS_SPEECH_MAX_TEXT_CHARS": "4000"}
    red = {"MOSS_SPEECH_SESSIONS_BACKEND": "redis", "MOSS_SPEECH_REDIS_URL": redis.url, **limits}
    services = {
        "spread": ServiceProcess(both, tmp / "s.log", **limits),
        "a": ServiceProcess(f"127.0.0.1:{tritons[0].grpc_port}", tmp / "a.log", **red),
        "b": ServiceProcess(f"127.0.0.1:{tritons[1].grpc_port}", tmp / "b.log", **red),
        "mem": ServiceProcess(f"127.0.0.1:{tritons[0].grpc_port}", tmp / "m.log", **limits),
    }
    try:
        with ThreadPoolExecutor(4) as ex:
            list(ex.map(lambda s: s.start(), services.values()))
        converse(services["spread"], "warm up")
        parts = set(args.parts.split(","))
        for _ in range(args.spread_rounds if "spread" in parts else 0):
            print("spread at c=8:", spread(services["spread"], tritons, args.turns), flush=True)
        if "spread" in parts:  # a replica benched by failed readiness checks shows here
            benched = services["spread"].logs().count("triton endpoint not ready")
            print(f"endpoints marked not ready during the run: {benched}", flush=True)
        if "prefix" in parts:
            print("prefix hit vs miss:", prefix(services["a"], services["b"], args.sessions, args.rows), flush=True)
        if "store" in parts:
            print("session store:", store_latency(services["mem"], services["a"], args.store_turns), flush=True)
    finally:
        for s in services.values():
            s.stop()
        for t in tritons:
            t.stop()
        redis.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
