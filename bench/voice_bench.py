"""Voice cloning benchmark.

Part 1, how a created voice reaches every vocoder instance (docs/contracts.md, "Created voices"): bytes per window
and added latency per window of
  * in-band    the conditioning (prompt codes + prompt mel + x-vector) travels with every window, llm -> vocoder;
               cost measured as a lower bound: serialising it and two copies (llm output -> shared memory ->
               vocoder input, as the Python backend moves tensors);
  * redis      a shared store: GET of the conditioning per window (no cache), or EXISTS per window with a cache
               per instance (deletes must be seen), against a local redis-server;
  * folder     the chosen one: a shared folder + content-addressed cache per instance: one stat per window on a
               hit, read + sha256 check + parse on a miss (once per voice per instance).
Part 2, through the real stack (tritonserver + `moss-speech serve`, tiny CPU repository): CreateVoice time, and
time to first audio with a created voice (prompt capped to VoiceLimits.prompt_tokens) vs the default voice and vs
a built-in voice of the same recording (whole prompt: the cost before the cap), interleaved in the same run.

    python bench/voice_bench.py [--turns 12] [--skip-stack]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import print_table  # noqa: E402

from moss_speech.model_repository.launcher import free_port  # noqa: E402

TEXT = (
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the quiet green forest "
    "before the sun goes down."
)


def espeak(path: Path, voice: str) -> Path:
    subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(path), TEXT], check=True, capture_output=True)
    return path


def per_call_us(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def distribution(codec_dir: Path, rec: Path) -> list[tuple[str, str]]:
    from moss_speech.builders.codec import SpeechCodec
    from moss_speech.builders.codec.voice_store import VoiceStore, conditioning_bytes, new_voice_id
    from moss_speech.contract.voices import VoiceLimits

    # as CreateVoice stores it: the prompt capped to VoiceLimits.prompt_tokens
    voice = SpeechCodec(codec_dir).make_voice(new_voice_id(), rec, prompt_tokens=VoiceLimits().prompt_tokens)
    blob = conditioning_bytes(voice.prompt_codes, voice.prompt_mel, voice.xvector)
    raw = voice.prompt_codes.nbytes + voice.prompt_mel.nbytes + voice.xvector.nbytes
    window_bytes = 8 * (5 + 20 + 3) + 8 * 7 + 16  # tokens (context 20 + chunk 5 + lookahead 3), meta, voice id
    prompt = f"{rec.name}: {len(voice.prompt_codes)} prompt tokens, mel {voice.prompt_mel.shape}"
    rows = [("recording / prompt", prompt), ("window without voice", f"{window_bytes} B")]

    def inband():
        arrays = [np.ascontiguousarray(a) for a in (voice.prompt_codes, voice.prompt_mel, voice.xvector)]
        shm = [a.tobytes() for a in arrays]  # llm -> shared memory
        [np.frombuffer(b, dtype=a.dtype).copy() for b, a in zip(shm, arrays, strict=True)]  # -> vocoder input

    rows.append(
        (
            "in-band",
            f"+{raw} B per window ({raw / window_bytes:.0f}x the window); "
            f">= {per_call_us(inband, 2000):.0f} us per window (2 copies, lower bound)",
        )
    )
    tmp = Path(tempfile.mkdtemp())
    store = VoiceStore(tmp)
    store.save(voice.voice_id, "b", "", "", 6.0, voice.prompt_codes, voice.prompt_mel, voice.xvector)
    port = free_port()
    redis = shutil.which("redis-server")
    if redis:
        proc = subprocess.Popen(
            [redis, "--port", str(port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            import redis as redis_lib

            r = redis_lib.Redis(port=port)
            for _ in range(50):
                try:
                    r.ping()
                    break
                except redis_lib.ConnectionError:
                    time.sleep(0.1)
            r.set(voice.voice_id, blob)

            def get_parse():
                with np.load(io.BytesIO(r.get(voice.voice_id))) as f:
                    [f[k] for k in f.files]

            rows.append(
                (
                    "redis, no cache",
                    f"{len(blob)} B read per window; {per_call_us(get_parse, 500):.0f} us per window (GET + parse)",
                )
            )
            rows.append(
                (
                    "redis + cache",
                    f"~30 B per window; {per_call_us(lambda: r.exists(voice.voice_id), 2000):.0f}"
                    " us per window (EXISTS round trip)",
                )
            )
        finally:
            proc.terminate()
            proc.wait()

    def miss():
        data = (tmp / f"{voice.voice_id}.npz").read_bytes()
        hashlib.sha256(data).hexdigest()
        with np.load(io.BytesIO(data)) as f:
            [f[k] for k in f.files]

    hit = per_call_us(lambda: store.exists(voice.voice_id), 5000)
    rows.append(
        (
            "folder + cache (chosen)",
            f"0 B per window; {hit:.1f} us per window (stat); miss once per voice "
            "and instance: "
            f"{per_call_us(miss, 500):.0f} us ({len(blob)} B read)",
        )
    )
    shutil.rmtree(tmp)
    return rows


async def stack(root: Path, rec_b: Path, turns: int) -> list[tuple[str, str]]:
    import grpc

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "service"))
    from service_support import ServiceProcess

    from moss_speech.builders.export.build import build_repository
    from moss_speech.builders.tiny import write_tiny_bundle
    from moss_speech.contract.serving import ServingConfig
    from moss_speech.model_repository.launcher import TritonServer
    from moss_speech.services.api import speech_pb2 as pb
    from moss_speech.services.api import speech_pb2_grpc

    # The same recording also as a built-in voice, which keeps its whole 8 s prompt (built-in voices are not
    # capped): what a created voice cost before the prompt cap, in the same run. The created voice keeps the
    # loudest VoiceLimits.prompt_tokens (20 = the default voice's 1.6 s), and every window re-decodes the prompt.
    write_tiny_bundle(root / "ckpt", seed=0)
    shutil.copy(rec_b, root / "ckpt" / "codec" / "voices" / "builtin_b.wav")
    serving = ServingConfig.for_target("cpu", max_context=1024, max_slots=8, vocoder_instances=1)
    build_repository(
        root / "ckpt", root / "ckpt" / "codec", target="cpu", out=root / "repo", serving=serving, progress=False
    )
    repo = root / "repo"
    srv = TritonServer(repo, http_port=None, grpc_port=None, metrics_port=None, ready_timeout=600).start()
    svc = ServiceProcess(
        srv.grpc_url,
        root / "service.log",
        MOSS_SPEECH_AUTH="none",
        MOSS_SPEECH_MAX_NEW_TOKENS="40",
        MOSS_SPEECH_MAX_MESSAGE_BYTES=str(8 << 20),
    ).start()
    try:
        async with grpc.aio.insecure_channel(svc.address) as ch:
            stub = speech_pb2_grpc.MossSpeechStub(ch)
            create = []
            for _ in range(3):
                t0 = time.perf_counter()
                v = await stub.CreateVoice(
                    pb.CreateVoiceRequest(name="b", audio=pb.AudioInput(data=rec_b.read_bytes())), timeout=600
                )
                create.append(time.perf_counter() - t0)
            seconds, prompt_tokens = v.duration_seconds, v.prompt_tokens

            async def ttfa(voice: str) -> float:
                cfg = pb.StreamConfig(
                    output=pb.OUTPUT_MODALITY_SPEECH,
                    voice=voice,
                    sampling=pb.Sampling(do_sample=False, repetition_penalty=1.0, max_new_tokens=40, min_new_tokens=40),
                )
                msgs = [
                    pb.StreamConverseRequest(config=cfg),
                    pb.StreamConverseRequest(text="tell me a story"),
                    pb.StreamConverseRequest(end_of_turn=pb.EndOfTurn()),
                ]
                t0 = time.perf_counter()
                first = None
                async for r in stub.StreamConverse(iter(msgs), timeout=120):  # to the end: a cut turn drains
                    if first is None and r.WhichOneof("kind") == "audio":  # in Triton and delays the next one
                        first = time.perf_counter() - t0
                return first * 1000

            gets = []  # the service checks a created voice before each turn: one GetVoice-like Triton call
            for _ in range(20):
                t0 = time.perf_counter()
                await stub.GetVoice(pb.GetVoiceRequest(voice_id=v.voice_id), timeout=60)
                gets.append(time.perf_counter() - t0)

            names = {"default": "default", "built-in, whole recording": "builtin_b", "created": v.voice_id}
            for voice in names.values():  # warm each (the created voice's first miss)
                await ttfa(voice)
            times: dict[str, list[float]] = {k: [] for k in names}
            for i in range(turns):  # interleaved in the same run, rotating which goes first
                order = list(names)[i % 3 :] + list(names)[: i % 3]
                for k in order:
                    times[k].append(await ttfa(names[k]))
        med = {k: statistics.median(x) for k, x in times.items()}
        rows = [
            (
                "CreateVoice",
                f"{statistics.median(create) * 1000:.0f} ms median of 3 "
                f"({seconds:.1f} s recording -> {prompt_tokens} prompt tokens; all: "
                f"{', '.join(f'{c * 1000:.0f}' for c in create)})",
            )
        ]
        rows.append(
            (
                "GetVoice (client round trip)",
                f"{statistics.median(gets) * 1000:.1f} ms median of 20 (the "
                "service's per-turn check of a created voice is its Triton part)",
            )
        )
        rows += [(f"TTFA {k}", f"{med[k]:.1f} ms median of {turns} (min {min(x):.0f})") for k, x in times.items()]
        for base in ("default", "built-in, whole recording"):
            pairs = [c - b for c, b in zip(times["created"], times[base], strict=True)]
            rows.append(
                (
                    f"created vs {base}",
                    f"{100 * (med['created'] / med[base] - 1):+.1f} % (medians); paired "
                    f"median {statistics.median(pairs):+.1f} ms",
                )
            )
        return rows
    finally:
        svc.stop()
        srv.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=12)
    p.add_argument("--skip-stack", action="store_true")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        from moss_speech.builders.codec.tiny import write_tiny_codec

        write_tiny_codec(root / "codec", seed=0)
        rec = espeak(root / "m3.wav", "en+m3")
        print_table("voice distribution, per window", distribution(root / "codec", rec))
        if not args.skip_stack:
            print_table("voice cloning through the stack", asyncio.run(stack(root, rec, args.turns)))


if __name__ == "__main__":
    main()
