"""OpenTelemetry traces of the service's turns, joined with Triton's own spans. Off unless `otlp_endpoint` is set.

Per turn the service records a `turn` span (end of the user's input -> final response) with children:
`encode` (input preparation: audio decode, history, tensors), `triton` (the ensemble call; its W3C `traceparent`
goes to Triton as gRPC metadata, so Triton's request/model/compute spans become its children), `first_token`
and `first_audio` (from the call to the first text / audio response), and a `done` event with usage. Spans are
exported by OTLP/HTTP (`<endpoint>/v1/traces`), the one exporter Triton supports too, so one collector endpoint
serves both. The trace id goes into the log records of the turn (`trace_id`).

opentelemetry is imported only when tracing is on: the service runs without the `tracing` extra.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from moss_speech.services.logging import trace_id_var

SERVICE_NAME = "moss-speech-orchestrator"
EXTRA_HINT = "tracing needs the `tracing` extra: pip install 'moss-speech-triton[tracing]'"


class TurnTrace:
    """The spans of one turn. This base class records nothing (tracing off)."""

    trace_id = ""

    def headers(self) -> dict[str, str]:
        """gRPC metadata for the Triton call (`traceparent`); {} when off."""
        return {}

    def call_started(self) -> None:
        """The ensemble call starts now (ends `encode`, starts `triton`)."""

    def mark(self, name: str) -> None:
        """`first_token` / `first_audio`: recorded once, as a span from the call's start to now."""

    def done(self, **attributes: Any) -> None:
        """The final response: a `done` event with these attributes."""

    def close(self) -> None:
        """End the turn's spans (an error status unless done() was called)."""


class _OtelTurn(TurnTrace):
    def __init__(self, tracer: Any, otel: Any, request_id: str, mode: str, start_ns: int) -> None:
        self._tracer, self._otel = tracer, otel
        self._span = tracer.start_span(
            "turn", start_time=start_ns, attributes={"moss_speech.request_id": request_id, "moss_speech.mode": mode}
        )
        self._ctx = otel.trace.set_span_in_context(self._span)
        self._start_ns = start_ns
        self._done = False
        self._call_ns: int | None = None
        self._call_span: Any = None
        self._marked: set[str] = set()
        self.trace_id = format(self._span.get_span_context().trace_id, "032x")
        self._token = trace_id_var.set(self.trace_id)

    def call_started(self) -> None:
        if self._call_span is not None:
            return
        self._call_ns = time.time_ns()
        self._tracer.start_span("encode", context=self._ctx, start_time=self._start_ns).end(end_time=self._call_ns)
        self._call_span = self._tracer.start_span(
            "triton", context=self._ctx, start_time=self._call_ns, kind=self._otel.trace.SpanKind.CLIENT
        )

    def headers(self) -> dict[str, str]:
        self.call_started()
        carrier: dict[str, str] = {}
        self._otel.propagate.inject(carrier, context=self._otel.trace.set_span_in_context(self._call_span))
        return carrier

    def mark(self, name: str) -> None:
        if name in self._marked:
            return
        self._marked.add(name)
        now = time.time_ns()
        start = self._call_ns if self._call_ns is not None else self._start_ns
        self._tracer.start_span(name, context=self._ctx, start_time=start).end(end_time=now)

    def done(self, **attributes: Any) -> None:
        self._done = True
        self._span.add_event("done", attributes={k: v for k, v in attributes.items() if v is not None})

    def close(self) -> None:
        if not self._done:  # failed, cancelled or abandoned before the final response
            self._span.set_status(self._otel.trace.Status(self._otel.trace.StatusCode.ERROR, "turn not completed"))
        if self._call_span is not None:
            self._call_span.end()
        self._span.end()
        with contextlib.suppress(ValueError):  # a token from another context (async generator finalised elsewhere)
            trace_id_var.reset(self._token)


class Tracing:
    """Makes TurnTraces. `Tracing()` is off; `Tracing.otlp(endpoint)` exports to a collector."""

    def __init__(self, tracer: Any = None, otel: Any = None, provider: Any = None) -> None:
        self._tracer, self._otel, self.provider = tracer, otel, provider

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @classmethod
    def from_endpoint(cls, endpoint: str) -> Tracing:
        return cls.otlp(endpoint) if endpoint else cls()

    @classmethod
    def otlp(cls, endpoint: str, exporter: Any = None) -> Tracing:
        """A tracer provider of its own (not the global one) exporting in batches to `endpoint`/v1/traces.
        `exporter` replaces the OTLP exporter (tests: the SDK's InMemorySpanExporter)."""
        try:
            from opentelemetry import propagate, trace  # noqa: PLC0415 - optional extra
            from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
            from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
            from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415
        except ImportError as e:
            raise RuntimeError(f"{EXTRA_HINT} ({e})") from None
        if exporter is None:
            try:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
                    OTLPSpanExporter,
                )
            except ImportError as e:
                raise RuntimeError(f"{EXTRA_HINT} ({e})") from None
            exporter = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
        provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
        provider.add_span_processor(BatchSpanProcessor(exporter))

        class _Otel:  # the modules a turn needs, passed instead of imported at module level
            pass

        otel = _Otel()
        otel.trace, otel.propagate = trace, propagate
        return cls(provider.get_tracer("moss_speech.services"), otel, provider)

    def start_turn(self, request_id: str, mode: str, started: float | None = None) -> TurnTrace:
        """The turn's spans, from `started` (time.perf_counter() at the end of the user's input) until close();
        until then its trace id is in every log record (`trace_id`)."""
        if self._tracer is None:
            return TurnTrace()
        start_ns = time.time_ns()
        if started is not None:
            start_ns -= int((time.perf_counter() - started) * 1e9)
        return _OtelTurn(self._tracer, self._otel, request_id, mode, start_ns)

    def shutdown(self) -> None:
        """Flush pending spans (service stop)."""
        if self.provider is not None:
            self.provider.shutdown()
