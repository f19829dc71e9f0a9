"""Run Triton's perf_analyzer from this environment.

tritonclient[grpc]==2.51 installs a `perf_analyzer` binary next to the interpreter. It links libcudart (from
the `nvidia-cuda-runtime-cu12` wheel, put on LD_LIBRARY_PATH here) and libb64 (Debian package libb64-0d).
Inside NVIDIA's SDK container perf_analyzer is on PATH and works as is.

    python bench/perf_analyzer.py -- -m MODEL -u 127.0.0.1:8001 -i grpc --streaming --concurrency-range 1:4
    python bench/perf_analyzer.py --demo     # start a toy decoupled model and stream against it
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path


def find_perf_analyzer() -> Path:
    here = Path(sys.executable).parent / "perf_analyzer"  # tritonclient's console binary in this venv
    if here.exists():
        return here
    found = shutil.which("perf_analyzer")
    if found:
        return Path(found)
    raise FileNotFoundError("perf_analyzer not found: pip install 'tritonclient[grpc]==2.51.0'")


def perf_analyzer_env() -> dict[str, str]:
    env = dict(os.environ)
    try:
        import nvidia.cuda_runtime  # noqa: PLC0415 - optional: only needed for the pip-installed binary
    except ImportError:
        return env
    lib = str(Path(next(iter(nvidia.cuda_runtime.__path__))) / "lib")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (lib, env.get("LD_LIBRARY_PATH")) if p)
    return env


def run_perf_analyzer(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    """perf_analyzer ARGS with the environment it needs; output captured as text."""
    return subprocess.run(
        [str(find_perf_analyzer()), *args],
        env=perf_analyzer_env(),
        capture_output=True,
        text=True,
        check=False,
        **kwargs,
    )


# A decoupled toy: N responses per request, 10 ms apart.
DEMO_CONFIG = """
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [{ name: "N" data_type: TYPE_INT32 dims: [ 1 ] }]
output [{ name: "V" data_type: TYPE_FP32 dims: [ 1 ] }]
"""
DEMO_MODEL = """
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        for r in requests:
            sender = r.get_response_sender()
            n = int(pb_utils.get_input_tensor_by_name(r, "N").as_numpy()[0])
            for i in range(n):
                time.sleep(0.01)
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("V", np.array([i], np.float32))]))
            sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
"""


def write_demo_repo(root: Path, responses: int = 5) -> tuple[Path, Path]:
    """A model repository with the toy `stream_toy`, and a perf_analyzer --input-data file for it."""
    model = root / "repo" / "stream_toy"
    (model / "1").mkdir(parents=True, exist_ok=True)
    (model / "config.pbtxt").write_text(textwrap.dedent(DEMO_CONFIG).lstrip())
    (model / "1" / "model.py").write_text(textwrap.dedent(DEMO_MODEL).lstrip())
    data = root / "input.json"
    data.write_text(json.dumps({"data": [{"N": [responses]}]}))
    return root / "repo", data


def demo_args(grpc_url: str, data: Path) -> list[str]:
    return ["-m", "stream_toy", "-u", grpc_url, "-i", "grpc", "--streaming", f"--input-data={data}",
            "--concurrency-range=1:2", "--measurement-interval=1000",
            "--stability-percentage=50"]  # fmt: skip


def stream_latencies_ms(profile_export: Path) -> dict[str, list[float]]:
    """Per request: first-response and last-response latency (ms) from `--profile-export-file` JSON.

    perf_analyzer 2.51 prints "using the first response for measuring latency" for decoupled models, but its
    Avg/p50 latency equals the whole stream on this toy; the per-response timestamps in the export are exact.
    """
    first, last = [], []
    for experiment in json.loads(profile_export.read_text())["experiments"]:
        for req in experiment["requests"]:
            ts = req["response_timestamps"]
            if ts:
                first.append((ts[0] - req["timestamp"]) / 1e6)
                last.append((ts[-1] - req["timestamp"]) / 1e6)
    return {"first": first, "last": last}


def _p50(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", action="store_true", help="serve a toy decoupled model and stream against it")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="-- then perf_analyzer arguments")
    ns = parser.parse_args()
    if not ns.demo:
        args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
        return subprocess.call([str(find_perf_analyzer()), *args], env=perf_analyzer_env())
    from moss_speech.model_repository.launcher import TritonServer  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        repo, data = write_demo_repo(Path(tmp))
        with TritonServer(repo, http_port=None, grpc_port=None, metrics_port=None) as srv:
            export = Path(tmp) / "profile.json"
            args = [*demo_args(srv.grpc_url, data), f"--profile-export-file={export}"]
            print("perf_analyzer", " ".join(args), flush=True)
            result = run_perf_analyzer(args, timeout=120)
            print(result.stdout + result.stderr)
            if result.returncode == 0:
                lat = stream_latencies_ms(export)
                first, last = _p50(lat["first"]), _p50(lat["last"])
                n = len(lat["first"])
                print(f"profile export: {n} streams, first response p50 {first:.1f} ms, last {last:.1f} ms")
            return result.returncode


if __name__ == "__main__":
    sys.exit(main())
