"""Added latency per turn of TLS + API-key check vs plaintext without keys, in the same run.

Two `moss-speech serve` processes on the same tritonserver: one plaintext without keys, one with TLS (a certificate
made here with `cryptography`) and API keys. Turns alternate between them (ABAB...), so load drifts hit both
alike. Each service gets one long-lived channel, as real clients keep one (the TLS handshake is paid once per
connection; `--new-channel` pays it every turn). Reported: median and p90 wall time per turn for each, and the
difference of the medians and the median of the paired differences.

    python bench/security_bench.py [--triton-url HOST:PORT] [--turns 60] [--tokens 4]

Without --triton-url it builds the tiny repository and starts a local tritonserver.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "service"))
from harness import print_table  # noqa: E402
from service_bench import MODELS, build_tiny  # noqa: E402
from tls_support import CA, bearer, make_keys, write_keys  # noqa: E402

from moss_speech.model_repository.launcher import TritonServer, free_port  # noqa: E402
from moss_speech.services.api import speech_pb2 as pb  # noqa: E402
from moss_speech.services.api import speech_pb2_grpc  # noqa: E402


def start_service(triton_url: str, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, int, int]:
    port, health = free_port(), free_port()
    full = {
        **os.environ,
        "MOSS_SPEECH_TRITON_URL": triton_url,
        "MOSS_SPEECH_GRPC_PORT": str(port),
        "MOSS_SPEECH_METRICS_PORT": str(free_port()),
        "MOSS_SPEECH_HEALTH_PORT": str(health),
        "MOSS_SPEECH_LOG_LEVEL": "WARNING",
        **env,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "moss_speech.cli.main", "serve"],
        env=full,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )  # noqa: SIM115
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 120
    with grpc.insecure_channel(f"localhost:{health}") as ch:
        while time.monotonic() < deadline:
            try:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return proc, port, health
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise SystemExit(f"service did not become SERVING; log: {log.read_text()[-2000:]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-url")
    parser.add_argument("--turns", type=int, default=60, help="turns per service")
    parser.add_argument("--tokens", type=int, default=4, help="max_new_tokens per turn (short: the overhead shows)")
    parser.add_argument("--new-channel", action="store_true", help="a new connection (TLS handshake) per turn")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        triton = None
        if args.triton_url is None:
            print("building the tiny repository and starting tritonserver ...", flush=True)
            triton = TritonServer(
                build_tiny(tmp),
                http_port=None,
                grpc_port=None,
                metrics_port=None,
                model_control_mode="explicit",
                load_models=MODELS,
                ready_timeout=300,
                log_stream=open(tmp / "triton.log", "w"),
            ).start()  # noqa: SIM115
        url = args.triton_url or triton.grpc_url
        ca = CA("bench CA")
        cert, key = ca.issue("localhost", server=True).write(tmp, "server")
        keys = make_keys("bench")
        write_keys(tmp / "keys", keys)
        plain, plain_port, _ = start_service(
            url, {"MOSS_SPEECH_PLAINTEXT": "true", "MOSS_SPEECH_AUTH": "none"}, tmp / "plain.log"
        )
        secure, secure_port, _ = start_service(
            url,
            {
                "MOSS_SPEECH_TLS_CERT_FILE": str(cert),
                "MOSS_SPEECH_TLS_KEY_FILE": str(key),
                "MOSS_SPEECH_API_KEYS_FILE": str(tmp / "keys"),
            },
            tmp / "secure.log",
        )
        try:

            def channel(secured: bool) -> grpc.Channel:
                if secured:
                    return grpc.secure_channel(f"localhost:{secure_port}", grpc.ssl_channel_credentials(ca.pem))
                return grpc.insecure_channel(f"localhost:{plain_port}")

            request = pb.ConverseRequest(
                text="hello there",
                output=pb.OUTPUT_MODALITY_TEXT,
                sampling=pb.Sampling(max_new_tokens=args.tokens, seed=1),
            )
            md = {True: bearer(keys["bench"]), False: ()}
            chans = {s: channel(s) for s in (False, True)}
            times: dict[bool, list[float]] = {False: [], True: []}
            for i in range(args.turns * 2 + 4):
                secured = bool(i % 2)
                ch = channel(secured) if args.new_channel else chans[secured]
                stub = speech_pb2_grpc.MossSpeechStub(ch)
                t0 = time.perf_counter()
                stub.Converse(request, metadata=md[secured], timeout=60)
                dt = 1000 * (time.perf_counter() - t0)
                if args.new_channel:
                    ch.close()
                if i >= 4:  # warm-up turns
                    times[secured].append(dt)
            pairs = [s - p for p, s in zip(times[False], times[True], strict=True)]

            def p90(xs: list[float]) -> float:
                return sorted(xs)[int(0.9 * (len(xs) - 1))]

            rows = [
                ("turns per mode", str(args.turns)),
                ("connection", "new per turn (handshake included)" if args.new_channel else "one per client"),
                (
                    "plaintext, no keys: median / p90 ms",
                    f"{statistics.median(times[False]):.2f} / {p90(times[False]):.2f}",
                ),
                ("TLS + API key: median / p90 ms", f"{statistics.median(times[True]):.2f} / {p90(times[True]):.2f}"),
                (
                    "added per turn: difference of medians ms",
                    f"{statistics.median(times[True]) - statistics.median(times[False]):+.2f}",
                ),
                ("added per turn: median of paired differences ms", f"{statistics.median(pairs):+.2f}"),
            ]
            print_table("TLS + API key vs plaintext (same run, alternating turns)", rows)
        finally:
            for proc in (plain, secure):
                proc.terminate()
                proc.wait(30)
            if triton is not None:
                triton.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
