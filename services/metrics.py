"""Prometheus metrics: the orchestrator's own, and the names of Triton's that the deployment relies on.

`ServiceMetrics` owns its `CollectorRegistry`, so tests (and several servers in one process) get independent
instances. The constants below are the names as Prometheus stores them (counters end in `_total`); the Helm
chart's autoscaling rules are checked against a live `ServiceMetrics().registry` and against `TRITON_METRICS`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from moss_speech.contract.metrics import LLM_ACTIVE_SEQUENCES, LLM_KV_SLOTS  # the llm model's gauges

# --- orchestrator metrics (exported names) --------------------------------------------------------------
REQUESTS_TOTAL = "moss_speech_requests_total"
TIME_TO_FIRST_AUDIO_SECONDS = "moss_speech_time_to_first_audio_seconds"
REAL_TIME_FACTOR = "moss_speech_real_time_factor"
ACTIVE_STREAMS = "moss_speech_active_streams"
GENERATED_TOKENS_TOTAL = "moss_speech_generated_tokens_total"
TRITON_ERRORS_TOTAL = "moss_speech_triton_errors_total"
SESSIONS = "moss_speech_sessions"
CONTEXT_TRUNCATIONS_TOTAL = "moss_speech_context_truncations_total"
TRITON_READY = "moss_speech_triton_ready"

# --- Triton metrics ----------------------------------------------------------------------------------------
# Triton's own names (documented in Triton's metrics guide; the Triton-serving tests check them against
# a running tritonserver's /metrics), and the gauge our Python-backend llm model exports via
# pb_utils.MetricFamily, named in moss_speech.contract.metrics (the adapters import them from there).
TRITON_REQUEST_SUCCESS = "nv_inference_request_success"
TRITON_REQUEST_FAILURE = "nv_inference_request_failure"
TRITON_INFERENCE_COUNT = "nv_inference_count"
TRITON_EXEC_COUNT = "nv_inference_exec_count"
TRITON_QUEUE_DURATION_US = "nv_inference_queue_duration_us"
TRITON_PENDING_REQUEST_COUNT = "nv_inference_pending_request_count"
TRITON_COMPUTE_INFER_DURATION_US = "nv_inference_compute_infer_duration_us"
TRITON_GPU_UTILIZATION = "nv_gpu_utilization"
TRITON_GPU_MEMORY_USED_BYTES = "nv_gpu_memory_used_bytes"

TRITON_METRICS = frozenset(
    {
        TRITON_REQUEST_SUCCESS,
        TRITON_REQUEST_FAILURE,
        TRITON_INFERENCE_COUNT,
        TRITON_EXEC_COUNT,
        TRITON_QUEUE_DURATION_US,
        TRITON_PENDING_REQUEST_COUNT,
        TRITON_COMPUTE_INFER_DURATION_US,
        TRITON_GPU_UTILIZATION,
        TRITON_GPU_MEMORY_USED_BYTES,
        LLM_ACTIVE_SEQUENCES,
        LLM_KV_SLOTS,
    }
)

# Label values.
MODES = ("s2s", "t2s")  # speech in / text in
CHANNELS = ("text", "audio")

# Buckets: time to first audio spans ~0.1 s (small model, idle) to seconds (loaded 9B); RTF < 1 is real time.
TTFA_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0)


def _base(name: str) -> str:
    """prometheus_client appends `_total` to counters itself."""
    return name.removesuffix("_total")


class ServiceMetrics:
    """All orchestrator metrics, registered in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            _base(REQUESTS_TOTAL),
            "Finished RPCs by method, input mode and gRPC status.",
            ["method", "mode", "status"],
            registry=r,
        )
        self.time_to_first_audio = Histogram(
            TIME_TO_FIRST_AUDIO_SECONDS,
            "From end of user input to the first PCM chunk sent, seconds.",
            buckets=TTFA_BUCKETS,
            registry=r,
        )
        self.real_time_factor = Histogram(
            REAL_TIME_FACTOR,
            "Generation wall time divided by generated audio duration, per turn.",
            buckets=RTF_BUCKETS,
            registry=r,
        )
        self.active_streams = Gauge(ACTIVE_STREAMS, "Open streaming RPCs.", registry=r)
        self.generated_tokens = Counter(
            _base(GENERATED_TOKENS_TOTAL), "Generated tokens by channel.", ["channel"], registry=r
        )
        self.triton_errors = Counter(_base(TRITON_ERRORS_TOTAL), "Failed Triton calls by kind.", ["kind"], registry=r)
        self.sessions = Gauge(SESSIONS, "Sessions held in memory.", registry=r)
        self.context_truncations = Counter(
            _base(CONTEXT_TRUNCATIONS_TOTAL), "Turns whose history was truncated to fit max_context_tokens.", registry=r
        )
        self.triton_ready = Gauge(
            TRITON_READY, "1 while Triton and both ensembles are ready (health loop).", registry=r
        )

    def exposition(self) -> bytes:
        """The text format served on /metrics."""
        return generate_latest(self.registry)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        """Serve /metrics (only that path; 404 elsewhere) on a background thread (settings.metrics_port)."""
        import threading
        from http.server import ThreadingHTTPServer

        from prometheus_client.exposition import MetricsHandler

        class OnlyMetrics(MetricsHandler.factory(self.registry)):
            def do_GET(self) -> None:
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404)
                    return
                super().do_GET()

            def log_message(self, *args) -> None:  # no per-scrape stderr lines
                pass

        host = addr.strip("[]")
        server_cls = type(
            "MetricsServer", (ThreadingHTTPServer,), {"daemon_threads": True, "address_family": _family(host)}
        )
        httpd = server_cls((host, port), OnlyMetrics)
        threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()


def _family(host: str) -> int:
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET
