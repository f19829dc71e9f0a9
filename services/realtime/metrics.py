"""Prometheus metrics of the gateway (its own registry; served on the gateway's HTTP port at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

ACTIVE_CONNECTIONS = "moss_speech_realtime_active_connections"  # the chart's HPA scales on this
TTFA_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class RealtimeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.connections = Gauge(ACTIVE_CONNECTIONS, "Open /v1/realtime WebSockets.", registry=r)
        self.rejected = Counter(
            "moss_speech_realtime_rejected_connections", "Handshakes refused (limit, path).", ["reason"], registry=r
        )
        self.events = Counter(
            "moss_speech_realtime_client_events", "Client events received, by type.", ["type"], registry=r
        )
        self.errors = Counter("moss_speech_realtime_errors", "`error` events sent, by code.", ["code"], registry=r)
        self.responses = Counter(
            "moss_speech_realtime_responses", "Finished responses, by status.", ["status"], registry=r
        )
        self.barge_ins = Counter(
            "moss_speech_realtime_barge_ins", "Responses cancelled because the user spoke.", registry=r
        )
        self.time_to_first_audio = Histogram(
            "moss_speech_realtime_time_to_first_audio_seconds",
            "Response start (end of the user's turn) to the first audio delta sent, seconds.",
            buckets=TTFA_BUCKETS,
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
