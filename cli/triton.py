"""`moss-speech triton`: start tritonserver on a model repository, forward logs, stop on SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time

from moss_speech.model_repository.launcher import BINARY_ENV, DEFAULT_PORTS, TritonServer, TritonStartError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "triton",
        help="run tritonserver on a model repository",
        description="Start tritonserver (container's or the nvidia-pytriton wheel's), wait until ready, "
        "forward logs, stop cleanly on SIGTERM/SIGINT. Arguments after `--` go to tritonserver unchanged.",
    )
    p.add_argument("--repo", required=True, help="model repository directory")
    p.add_argument("--http-port", type=int, default=DEFAULT_PORTS[0])
    p.add_argument("--grpc-port", type=int, default=DEFAULT_PORTS[1])
    p.add_argument("--metrics-port", type=int, default=DEFAULT_PORTS[2])
    p.add_argument(
        "--bind-address",
        default="0.0.0.0",
        help="interface tritonserver's HTTP, gRPC and metrics ports listen on (default 0.0.0.0, for the "
        "container; 127.0.0.1 keeps a local server private)",
    )
    p.add_argument(
        "--server-binary",
        default=None,
        help=f"auto|path|wheel|/path/to/tritonserver (default: ${BINARY_ENV}, else auto: PATH, then wheel)",
    )
    p.add_argument("--model-control-mode", choices=("none", "poll", "explicit"), default=None)
    p.add_argument("--load-model", action="append", default=[], help="with explicit mode; repeatable, or '*'")
    p.add_argument(
        "--no-histogram-latencies",
        dest="histogram_latencies",
        action="store_false",
        help="drop --metrics-config histogram_latencies=true (first-response latency histogram)",
    )
    p.add_argument("--log-verbose", type=int, default=0)
    p.add_argument(
        "--trace-otlp-url", default=None, help="OpenTelemetry tracing: OTLP/HTTP collector base URL (http://host:4318)"
    )
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for /v2/health/ready")
    p.add_argument("--stop-timeout", type=float, default=30.0, help="seconds after SIGTERM before SIGKILL")
    p.add_argument(
        "--skip-gpu-check",
        action="store_true",
        help="do not check that a KIND_GPU repository's runtime (TensorRT, onnxruntime CUDA, torch CUDA) "
        "loads before starting tritonserver",
    )
    p.add_argument("extra", nargs=argparse.REMAINDER, help="-- then extra tritonserver arguments")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    extra = list(args.extra)
    if extra and extra[0] == "--":
        extra = extra[1:]
    if not args.skip_gpu_check:
        # A GPU repository whose runtime cannot load fails here, in one line, not minutes later inside Triton.
        from moss_speech.model_repository.runtime.gpu_check import GpuCheckError, check_repository

        try:
            found = check_repository(args.repo)
        except GpuCheckError as e:
            print(f"moss-speech triton: GPU check failed: {e}", file=sys.stderr, flush=True)
            return 3
        if found:
            print(f"moss-speech triton: GPU check passed: {', '.join(found)}", file=sys.stderr, flush=True)
    try:
        srv = TritonServer(
            args.repo,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            binary=args.server_binary,
            model_control_mode=args.model_control_mode,
            load_models=args.load_model,
            histogram_latencies=args.histogram_latencies,
            log_verbose=args.log_verbose,
            trace_otlp_url=args.trace_otlp_url,
            bind_address=args.bind_address,
            extra_args=extra,
            log_stream=sys.stdout,
            ready_timeout=args.ready_timeout,
            stop_timeout=args.stop_timeout,
        )
    except FileNotFoundError as e:
        print(f"moss-speech triton: {e}", file=sys.stderr)
        return 2

    stop_requested: list[float] = []

    def forward(signum: int, _frame: object) -> None:
        # Triton drains in-flight requests on SIGTERM/SIGINT; a second signal means "now".
        if stop_requested:
            srv._kill_group()
        stop_requested.append(time.monotonic())
        srv.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"moss-speech triton: starting {' '.join(srv.command())}", file=sys.stderr, flush=True)
        srv.start(wait=False)
        try:
            srv.wait_ready()
        except TritonStartError as e:
            if stop_requested:  # interrupted while loading: not an error of ours
                return _exit_code(srv.stop(args.stop_timeout))
            srv.stop(args.stop_timeout)
            print(f"moss-speech triton: {e}", file=sys.stderr, flush=True)
            return 1
        print(
            f"moss-speech triton: ready http={srv.http_url} grpc={srv.grpc_url} metrics={srv.metrics_url}",
            file=sys.stderr,
            flush=True,
        )
        while True:
            try:
                code = srv.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if stop_requested and time.monotonic() - stop_requested[0] > args.stop_timeout:
                    print("moss-speech triton: stop timeout, killing", file=sys.stderr, flush=True)
                    srv._kill_group()
        srv._kill_group()
        srv._join_reader()
        return _exit_code(code)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N -> 128+N, as shells report it
