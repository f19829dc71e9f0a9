"""The chart's queries against a real Prometheus scraping the real service and tritonserver under a short load,
and one trace joining the service's spans with Triton's (OpenTelemetry, OTLP/HTTP, W3C traceparent).

Every dashboard panel query, every alert expression (its query without the threshold; the whole rule file is
loaded into Prometheus too) and every prometheus-adapter rule query must parse and return data, unless it reads
a GPU metric (DCGM_FI_*, nv_gpu_*) and its panel says it needs a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from obs_support import DASHBOARD, OtlpReceiver, Prometheus, Query, adapter_queries, alert_queries, dashboard_queries

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # .../tests, for tritonharness and helm_support
from tritonharness import tritonserver_available  # noqa: E402

from moss_speech.model_repository.launcher import TritonServer, free_port  # noqa: E402
from tests.helm.helm_support import Helm, by_kind  # noqa: E402

pytestmark = pytest.mark.slow
MODELS = ["speech_encoder", "llm", "vocoder", "s2s", "t2s"]
NAMESPACE = "speech"
PODS = {"orchestrator": "moss-orchestrator-0", "triton": "moss-triton-0", "realtime": "moss-realtime-0"}
LOAD_SECONDS = 15


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    pytest.importorskip("opentelemetry.sdk", reason="the `tracing` extra is not installed")
    r = OtlpReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def triton(cpu_repo, receiver) -> Iterator[TritonServer]:
    if not tritonserver_available():
        pytest.skip("no tritonserver")
    srv = TritonServer(
        cpu_repo,
        http_port=None,
        grpc_port=None,
        metrics_port=None,
        model_control_mode="explicit",
        load_models=MODELS,
        ready_timeout=240,
        stop_timeout=20,
        trace_otlp_url=receiver.url,
        extra_args=["--trace-config=opentelemetry,bsp_schedule_delay=200"],
    )
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def service(triton, receiver, tmp_path_factory) -> Iterator[dict]:
    port, metrics_port = free_port(), free_port()
    log_path = tmp_path_factory.mktemp("obs-service") / "service.log"
    env = {
        **os.environ,
        "MOSS_SPEECH_TRITON_URL": triton.grpc_url,
        "MOSS_SPEECH_GRPC_PORT": str(port),
        "MOSS_SPEECH_METRICS_PORT": str(metrics_port),
        "MOSS_SPEECH_LOG_FORMAT": "json",
        "MOSS_SPEECH_PLAINTEXT": "true",
        "MOSS_SPEECH_AUTH": "none",
        "MOSS_SPEECH_MAX_NEW_TOKENS": "16",
        "MOSS_SPEECH_REQUEST_TIMEOUT_SECONDS": "3",
        "MOSS_SPEECH_HEALTH_CHECK_SECONDS": "0.3",
        "MOSS_SPEECH_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moss_speech.cli.main", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            _wait_serving(f"localhost:{port}", proc, log_path)
            yield {"address": f"localhost:{port}", "metrics_port": metrics_port, "log": log_path}
        finally:
            proc.terminate()
            proc.wait(30)


@pytest.fixture(scope="module")
def gateway(service, tmp_path_factory) -> Iterator[dict]:
    """The real realtime gateway in front of the service (its metrics feed the chart's realtime adapter rule)."""
    import urllib.request

    port = free_port()
    env = {
        **os.environ,
        "MOSS_REALTIME_SERVICE_URL": service["address"],
        "MOSS_REALTIME_HOST": "127.0.0.1",
        "MOSS_REALTIME_PORT": str(port),
    }
    log_path = tmp_path_factory.mktemp("obs-gateway") / "gateway.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moss_speech.cli.main", "realtime"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(log_path.read_text()[-3000:]) from None
                    time.sleep(0.3)
            yield {"port": port}
        finally:
            proc.terminate()
            proc.wait(30)


def _wait_serving(address: str, proc: subprocess.Popen, log_path: Path) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 90
    with grpc.insecure_channel(address) as ch:
        while time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TimeoutError(log_path.read_text()[-3000:])


@pytest.fixture(scope="module")
def chart() -> dict:
    """The chart rendered with alerts on: the PrometheusRule and the adapter rules."""
    from tests.helm.helm_tool import ensure_helm

    docs = Helm(ensure_helm()).render([Path(__file__).parent / "observability-values.yaml"])
    rule = next(iter(by_kind(docs, "PrometheusRule").values()))
    adapter = next(d for d in by_kind(docs, "ConfigMap").values() if "config.yaml" in d["data"])
    return {"rule": rule, "adapter": yaml.safe_load(adapter["data"]["config.yaml"])}


@pytest.fixture(scope="module")
def loaded(service, triton, gateway, chart, tmp_path_factory) -> Iterator[Prometheus]:
    """Prometheus scraping the service, tritonserver and the gateway, with the chart's alert rules loaded, after a
    short load."""
    work = tmp_path_factory.mktemp("prometheus")
    rules = work / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": chart["rule"]["spec"]["groups"]}))
    prom = Prometheus(
        work,
        free_port(),
        {
            "orchestrator": (
                f"127.0.0.1:{service['metrics_port']}",
                {"namespace": NAMESPACE, "pod": PODS["orchestrator"]},
            ),
            "triton": (f"127.0.0.1:{triton.metrics_port}", {"namespace": NAMESPACE, "pod": PODS["triton"]}),
            "realtime": (f"127.0.0.1:{gateway['port']}", {"namespace": NAMESPACE, "pod": PODS["realtime"]}),
        },
        [rules],
    ).start()
    try:
        stats = run_load(service["address"])
        time.sleep(4)  # a few more scrapes after the load
        prom.stats = stats
        yield prom
    finally:
        prom.stop()


def run_load(address: str) -> dict[str, int]:
    """Two clients asking spoken answers to text for LOAD_SECONDS, one bad request (INVALID_ARGUMENT) and one
    turn longer than the service's 3 s Triton deadline (DEADLINE_EXCEEDED: an error for the error panels)."""
    from moss_speech.services.api import speech_pb2, speech_pb2_grpc

    counts: dict[str, int] = {}
    lock = threading.Lock()

    def call(stub, **kw) -> None:
        try:
            stub.Converse(speech_pb2.ConverseRequest(**kw), timeout=30)
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
        with lock:
            counts[code] = counts.get(code, 0) + 1

    def client(stop_at: float) -> None:
        with grpc.insecure_channel(address) as ch:
            stub = speech_pb2_grpc.MossSpeechStub(ch)
            while time.monotonic() < stop_at:
                call(stub, text="Hello, how are you today?")

    with grpc.insecure_channel(address) as ch:
        stub = speech_pb2_grpc.MossSpeechStub(ch)
        call(stub, text="   ")  # INVALID_ARGUMENT
        # 600 speech tokens (48 s of audio) fit the served cap and take far longer than the 3 s deadline.
        call(
            stub, text="Tell me a long story.", sampling=speech_pb2.Sampling(max_new_tokens=600, min_new_tokens=600)
        )  # DEADLINE_EXCEEDED
    stop_at = time.monotonic() + LOAD_SECONDS
    threads = [threading.Thread(target=client, args=(stop_at,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


def chart_queries(chart: dict) -> list[Query]:
    return (
        dashboard_queries(json.loads(DASHBOARD.read_text()))
        + alert_queries(chart["rule"])
        + adapter_queries(chart["adapter"], NAMESPACE, list(PODS.values()))
    )


def test_every_chart_query_returns_data(loaded: Prometheus, chart: dict) -> None:
    assert loaded.stats.get("OK", 0) >= 4, loaded.stats
    checked, gpu_only, failures = 0, 0, []
    for q in chart_queries(chart):
        if q.name.endswith("(seriesQuery)"):
            body = loaded.api("series", **{"match[]": q.expr})
            status, result, error = body["status"], body.get("data", []), body.get("error", "")
        else:
            status, result, error = loaded.query(q.expr)
        if status != "success":
            failures.append(f"{q.source} {q.name}: does not parse: {error}")
        elif not result and not q.needs_gpu:
            failures.append(f"{q.source} {q.name}: no data: {q.expr}")
        checked += 1
        gpu_only += q.needs_gpu
    print(
        f"\nchart queries checked against the live Prometheus: {checked} "
        f"({gpu_only} need a GPU/DCGM and may be empty); load: {loaded.stats}"
    )
    assert not failures, "\n".join(failures)


def test_alert_rules_load_and_evaluate(loaded: Prometheus, chart: dict) -> None:
    names = {r["alert"] for g in chart["rule"]["spec"]["groups"] for r in g["rules"]}
    groups = loaded.api("rules")["data"]["groups"]
    got = {r["name"]: r for g in groups for r in g["rules"]}
    assert names <= set(got)
    for name in names:
        assert got[name]["health"] == "ok", (name, got[name].get("lastError"))
        assert "runbook_url" in got[name]["annotations"]


def test_one_trace_joins_service_and_triton(loaded: Prometheus, receiver: OtlpReceiver, service: dict) -> None:
    deadline = time.monotonic() + 20
    joined: set[str] = set()
    while time.monotonic() < deadline and not joined:
        spans = receiver.snapshot()
        by_trace: dict[str, set[str]] = {}
        for s in spans:
            by_trace.setdefault(s.trace_id, set()).add(s.service)
        joined = {t for t, services in by_trace.items() if {"moss-speech-orchestrator", "triton"} <= services}
        time.sleep(0.5)
    assert joined, f"no trace with both services; services seen: {sorted({s.service for s in spans})}"
    trace = next(iter(joined))
    spans = [s for s in receiver.snapshot() if s.trace_id == trace]
    ours = {s.name: s for s in spans if s.service == "moss-speech-orchestrator"}
    assert {"turn", "encode", "triton", "first_token", "first_audio"} <= set(ours), sorted(ours)
    # Triton's top-level span hangs under our `triton` client span.
    triton_roots = [s for s in spans if s.service == "triton" and s.parent_id == ours["triton"].span_id]
    assert triton_roots, [(s.name, s.parent_id) for s in spans if s.service == "triton"]
    # The turn's log lines carry its trace id.
    logs = [json.loads(line) for line in service["log"].read_text().splitlines() if line.startswith("{")]
    assert any(r.get("trace_id") == trace and r["msg"] == "turn done" for r in logs)
