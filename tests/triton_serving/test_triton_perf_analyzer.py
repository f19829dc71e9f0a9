"""perf_analyzer (tritonclient 2.51's binary) streams against a decoupled toy model on a real server."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from perf_analyzer import (  # noqa: E402
    demo_args,
    find_perf_analyzer,
    run_perf_analyzer,
    stream_latencies_ms,
    write_demo_repo,
)

pytestmark = pytest.mark.slow


def test_perf_analyzer_streaming(triton_server, tmp_path: Path) -> None:
    try:
        find_perf_analyzer()
    except FileNotFoundError:
        pytest.skip("no perf_analyzer")
    version = run_perf_analyzer(["--version"], timeout=30)
    if "error while loading shared libraries" in version.stderr:
        pytest.skip(f"perf_analyzer cannot start here: {version.stderr.strip()}")  # libb64-0d / cudart missing
    repo, data = write_demo_repo(tmp_path, responses=5)
    srv = triton_server(repo)
    export = tmp_path / "profile.json"
    args = [a for a in demo_args(srv.grpc_url, data) if not a.startswith("--concurrency-range")]
    result = run_perf_analyzer([*args, "--concurrency-range=1", f"--profile-export-file={export}"], timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Detected decoupled model" in result.stdout
    assert "Response Throughput" in result.stdout
    lat = stream_latencies_ms(export)
    assert lat["first"], "no requests in the profile export"
    # The toy sends 5 responses 10 ms apart: the first arrives well before the last.
    assert sorted(lat["first"])[len(lat["first"]) // 2] + 25 < sorted(lat["last"])[len(lat["last"]) // 2]
