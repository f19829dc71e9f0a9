"""ServiceMetrics: independent registries, the contracted names and labels in the exposition."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from moss_speech.services import metrics as m

PROM_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def samples(metrics: m.ServiceMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_instances_are_independent() -> None:
    a, b = m.ServiceMetrics(), m.ServiceMetrics()  # no "Duplicated timeseries" error
    a.active_streams.inc(3)
    a.requests.labels(method="StreamConverse", mode="s2s", status="OK").inc()
    assert samples(a)[(m.ACTIVE_STREAMS, ())] == 3
    assert samples(b)[(m.ACTIVE_STREAMS, ())] == 0
    assert not any(name == m.REQUESTS_TOTAL for name, _ in samples(b))


def test_exported_names_and_labels() -> None:
    x = m.ServiceMetrics()
    x.requests.labels(method="Converse", mode="t2s", status="OK").inc()
    x.generated_tokens.labels(channel="audio").inc(25)
    x.triton_errors.labels(kind="unavailable").inc()
    x.context_truncations.inc()
    x.sessions.set(4)
    x.time_to_first_audio.observe(0.4)
    x.real_time_factor.observe(0.3)
    got = samples(x)
    assert got[(m.REQUESTS_TOTAL, (("method", "Converse"), ("mode", "t2s"), ("status", "OK")))] == 1
    assert got[(m.GENERATED_TOKENS_TOTAL, (("channel", "audio"),))] == 25
    assert got[(m.TRITON_ERRORS_TOTAL, (("kind", "unavailable"),))] == 1
    assert got[(m.CONTEXT_TRUNCATIONS_TOTAL, ())] == 1
    assert got[(m.SESSIONS, ())] == 4
    assert got[(m.TIME_TO_FIRST_AUDIO_SECONDS + "_count", ())] == 1
    assert got[(m.REAL_TIME_FACTOR + "_bucket", (("le", "0.5"),))] == 1


def test_triton_names_are_separate_and_well_formed() -> None:
    own = {name for name, _ in samples(m.ServiceMetrics())}
    for name in m.TRITON_METRICS:
        assert PROM_NAME.fullmatch(name)
        assert name not in own
    assert m.LLM_ACTIVE_SEQUENCES.startswith("moss_speech_")
