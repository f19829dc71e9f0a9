"""`moss-speech up` (the whole local stack) and `moss-speech realtime` (the Realtime WebSocket gateway alone).

`up`: tiny checkpoint (or --checkpoint/--codec) -> CPU model repository -> tritonserver -> the gRPC service and the
realtime gateway (one process, one event loop), all on 127.0.0.1; prints every endpoint and stays up until Ctrl-C /
SIGTERM, then stops everything. Ports are free ones unless given.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    rt = sub.add_parser("realtime", help="the OpenAI-Realtime-compatible WebSocket gateway (MOSS_REALTIME_* env)")
    rt.add_argument("--service-url", help="the gRPC service host:port (MOSS_REALTIME_SERVICE_URL)")
    rt.add_argument("--host", help="bind address (MOSS_REALTIME_HOST)")
    rt.add_argument("--port", type=int, help="port (MOSS_REALTIME_PORT)")
    rt.set_defaults(func=cmd_realtime)

    up = sub.add_parser("up", help="tritonserver + gRPC service + realtime gateway on loopback, until Ctrl-C")
    up.add_argument("--work", type=Path, default=Path("up-out"), help="working directory (reused when rerun)")
    up.add_argument("--checkpoint", type=Path, default=None, help="MOSS-Speech checkpoint (default: a tiny one)")
    up.add_argument("--codec", type=Path, default=None, help="MOSS-Speech-Codec directory (default: the tiny one)")
    up.add_argument("--grpc-port", type=int, default=0, help="gRPC service port (0 = a free one)")
    up.add_argument("--realtime-port", type=int, default=0, help="WebSocket/page port (0 = a free one)")
    up.add_argument("--metrics-port", type=int, default=0, help="service metrics port (0 = a free one)")
    up.add_argument("--max-new-tokens", type=int, default=None, help="default answer length cap")
    up.set_defaults(func=cmd_up)


def cmd_realtime(args: argparse.Namespace) -> int:
    from moss_speech.services.realtime.server import serve_forever
    from moss_speech.services.realtime.settings import RealtimeSettings

    overrides = {
        k: v
        for k, v in {"service_url": args.service_url, "host": args.host, "port": args.port}.items()
        if v is not None
    }
    asyncio.run(serve_forever(RealtimeSettings(**overrides)))
    return 0


def local_checkpoint(
    work: Path, checkpoint: Path | None, codec: Path | None, command: str, on_write: Callable[[Path], None]
) -> tuple[Path, Path]:
    """The checkpoint and codec to serve: the given ones, or a tiny random bundle in `work/tiny` (written once;
    `on_write` is told before the write, `moss-speech demo` says when it is reused)."""
    if checkpoint is None:
        from moss_speech.builders.tiny import write_tiny_bundle

        checkpoint = work / "tiny"
        if not (checkpoint / "config.json").is_file():
            on_write(checkpoint)
            write_tiny_bundle(checkpoint)
        codec = codec or checkpoint / "codec"
    if codec is None:
        raise SystemExit(f"moss-speech {command}: --codec is required with --checkpoint")
    return checkpoint, codec


def cpu_repository(work: Path, checkpoint: Path, codec: Path) -> Path:
    from moss_speech.builders.export.build import build_repository

    repo = work / "repo"
    build_repository(checkpoint, codec, "cpu", repo)
    return repo


def local_triton(repo: Path, work: Path):
    """A tritonserver on free loopback ports for `repo`, its log in work/tritonserver.log (a context manager)."""
    from moss_speech.model_repository.launcher import TritonServer

    return TritonServer(
        repo,
        http_port=None,
        grpc_port=None,
        metrics_port=None,
        ready_timeout=600,
        log_stream=open(work / "tritonserver.log", "w"),  # noqa: SIM115 - the server owns it
    )


def cmd_up(args: argparse.Namespace) -> int:
    from moss_speech.model_repository.launcher import free_port

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    checkpoint, codec = local_checkpoint(
        work,
        args.checkpoint,
        args.codec,
        "up",
        lambda path: print(f"tiny random checkpoint + codec -> {path}", flush=True),
    )
    print(f"building the CPU model repository -> {work / 'repo'}", flush=True)
    repo = cpu_repository(work, checkpoint, codec)
    print("starting tritonserver", flush=True)
    with local_triton(repo, work) as triton:
        ports = {
            "grpc": args.grpc_port or free_port(),
            "metrics": args.metrics_port or free_port(),
            "realtime": args.realtime_port or free_port(),
        }
        asyncio.run(_serve(triton, ports, args))
    print("stopped", flush=True)
    return 0


async def _serve(triton, ports: dict[str, int], args: argparse.Namespace) -> None:
    from moss_speech.services.lifecycle import wait_for_stop_signal
    from moss_speech.services.logging import setup_logging
    from moss_speech.services.realtime.server import RealtimeServer
    from moss_speech.services.realtime.settings import RealtimeSettings
    from moss_speech.services.server import Service
    from moss_speech.services.settings import ServiceSettings

    setup_logging("WARNING", "text")
    extra = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
    # The local stack: loopback only, explicitly plaintext and without API keys (said below when it is up).
    service = Service(
        ServiceSettings(
            triton_url=triton.grpc_url,
            grpc_port=ports["grpc"],
            metrics_port=ports["metrics"],
            bind_address="127.0.0.1",
            plaintext=True,
            auth="none",
            **extra,
        ),
        host="127.0.0.1",
    )
    await service.start()
    gateway = RealtimeServer(
        RealtimeSettings(service_url=f"127.0.0.1:{ports['grpc']}", host="127.0.0.1", port=ports["realtime"])
    )
    await gateway.start()
    for _ in range(600):  # the service turns SERVING once Triton's ensembles are ready
        if await gateway.bridge.serving():
            break
        await asyncio.sleep(0.2)
    rt = ports["realtime"]
    print(
        "\nMOSS-Speech is up (loopback only; plaintext gRPC and no API keys: a local stack, not a deployment):\n"
        f"  tritonserver gRPC       {triton.grpc_url}\n"
        f"  speech gRPC API         127.0.0.1:{ports['grpc']}        (moss_speech.v1.MossSpeech)\n"
        f"  service metrics         http://127.0.0.1:{ports['metrics']}/metrics\n"
        f"  Realtime WebSocket      ws://127.0.0.1:{rt}/v1/realtime   (OpenAI base_url http://127.0.0.1:{rt}/v1)\n"
        f"  browser page            http://127.0.0.1:{rt}/\n"
        f"  gateway metrics         http://127.0.0.1:{rt}/metrics\n"
        "Ctrl-C stops everything.",
        flush=True,
    )
    await wait_for_stop_signal()
    print("stopping", flush=True)
    await gateway.stop()
    await service.stop(grace=2.0)
