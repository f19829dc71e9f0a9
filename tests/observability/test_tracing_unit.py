"""services.tracing without a server: off is a no-op; on, a turn's spans, its traceparent and its log trace id."""

from __future__ import annotations

import io
import json
import re
import time

import pytest

from moss_speech.services.logging import get_logger, setup_logging
from moss_speech.services.tracing import Tracing, TurnTrace


def test_off_records_nothing() -> None:
    tracing = Tracing.from_endpoint("")
    assert not tracing.enabled
    tt = tracing.start_turn("r1", "t2s")
    assert type(tt) is TurnTrace and tt.headers() == {} and tt.trace_id == ""
    tt.mark("first_audio")
    tt.done(generated_tokens=3)
    tt.close()


def test_turn_spans_traceparent_and_log_trace_id() -> None:
    memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    exporter = memory.InMemorySpanExporter()
    tracing = Tracing.otlp("http://unused:4318", exporter=exporter)
    stream = io.StringIO()
    setup_logging("INFO", "json", stream)
    t0 = time.perf_counter()
    tt = tracing.start_turn("req-1", "s2s", started=t0)
    headers = tt.headers()
    get_logger("test").info("inside the turn")
    tt.mark("first_token")
    tt.mark("first_audio")
    tt.mark("first_audio")  # once only
    tt.done(generated_tokens=5, stop_reason="max_new_tokens")
    tt.close()
    get_logger("test").info("after the turn")
    tracing.shutdown()

    m = re.fullmatch(r"00-([0-9a-f]{32})-([0-9a-f]{16})-01", headers["traceparent"])
    assert m and m[1] == tt.trace_id
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"turn", "encode", "triton", "first_token", "first_audio"}
    assert format(spans["triton"].context.span_id, "016x") == m[2]  # Triton's spans hang under `triton`
    turn = spans["turn"]
    assert all(s.parent.span_id == turn.context.span_id for n, s in spans.items() if n != "turn")
    assert [e.name for e in turn.events] == ["done"] and turn.status.is_ok
    assert turn.attributes["moss_speech.request_id"] == "req-1"
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["trace_id"] == tt.trace_id and "trace_id" not in lines[1]


def test_unfinished_turn_is_an_error() -> None:
    memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")
    exporter = memory.InMemorySpanExporter()
    tracing = Tracing.otlp("http://unused:4318", exporter=exporter)
    tt = tracing.start_turn("req-2", "t2s")
    tt.headers()
    tt.close()  # cancelled before the final response
    tracing.shutdown()
    (turn,) = [s for s in exporter.get_finished_spans() if s.name == "turn"]
    assert not turn.status.is_ok
