"""HPAs and prometheus-adapter rules: they scale the right Deployments on metrics that really exist.

Metric names are checked against live `ServiceMetrics` and `RealtimeMetrics` registries (what the orchestrator and
the realtime gateway export) and against `TRITON_METRICS` in services/metrics.py (Triton's documented names plus
our llm gauge; the Triton-serving tests check those against a running tritonserver's /metrics).
"""

from __future__ import annotations

import re

import pytest
import yaml
from helm_support import KUBE_VERSIONS, VALUES_SETS, by_kind, chart_values, component

from moss_speech.services import metrics as m
from moss_speech.services.realtime.metrics import RealtimeMetrics

KV = KUBE_VERSIONS[-1]
SERIES_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}


def exported_series(registry=None) -> set[str]:
    """Series names a fresh registry (default: the orchestrator's ServiceMetrics) exposes, read from its /metrics
    text."""
    names = set()
    for line in (registry or m.ServiceMetrics()).exposition().decode().splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            names.update(name + s for s in SERIES_SUFFIXES.get(kind, ()))
    return names


def adapter_rules(docs: list[dict]) -> list[dict]:
    (cm,) = [d for name, d in by_kind(docs, "ConfigMap").items() if name.endswith("adapter-rules")]
    return yaml.safe_load(cm["data"]["config.yaml"])["rules"]


def series_in(query: str) -> set[str]:
    """Metric names in a PromQL query: identifiers directly followed by a `{` selector."""
    return set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", query))


def exposed_name(rule: dict, series: str) -> str:
    """The custom-metrics name prometheus-adapter gives a series under this rule's `name` section."""
    name = rule.get("name", {})
    pattern = name.get("matches", "")
    if not re.search(pattern, series):
        return ""
    return re.sub(pattern, name["as"], series) if name.get("as") else series


def hpa_pod_metrics(hpa: dict) -> list[str]:
    return [x["pods"]["metric"]["name"] for x in hpa["spec"]["metrics"] if x["type"] == "Pods"]


def test_live_registry_has_the_contracted_names() -> None:
    series = exported_series()
    for name in (
        m.REQUESTS_TOTAL,
        m.ACTIVE_STREAMS,
        m.SESSIONS,
        m.GENERATED_TOKENS_TOTAL,
        m.TRITON_ERRORS_TOTAL,
        m.CONTEXT_TRUNCATIONS_TOTAL,
        m.TIME_TO_FIRST_AUDIO_SECONDS + "_bucket",
        m.REAL_TIME_FACTOR + "_bucket",
    ):
        assert name in series


@pytest.mark.parametrize("values_set", sorted(VALUES_SETS))
def test_adapter_rules_read_existing_metrics(rendered, values_set: str) -> None:
    known = exported_series() | exported_series(RealtimeMetrics()) | m.TRITON_METRICS
    rules = adapter_rules(rendered[(values_set, KV)])
    assert rules
    for rule in rules:
        (series,) = series_in(rule["seriesQuery"])
        used = series_in(rule["metricsQuery"].replace("<<.Series>>", series))
        assert series in known, series
        assert used <= known, used - known
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert exposed_name(rule, series)


def test_hpas_use_metrics_the_adapter_serves(rendered) -> None:
    docs = rendered[("autoscaling", KV)]
    rules = adapter_rules(docs)
    served = {exposed_name(r, next(iter(series_in(r["seriesQuery"])))) for r in rules}
    own = exported_series()
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert len(hpas) == 2
    for name in ("triton", "orchestrator"):
        hpa = component(docs, "HorizontalPodAutoscaler", name)
        used = hpa_pod_metrics(hpa)
        assert used and set(used) <= served, (name, used, served)
        target = hpa["spec"]["scaleTargetRef"]
        assert target["name"] == component(docs, "Deployment", name)["metadata"]["name"]
        # The HPA owns the replica count: the Deployment must not fight it on upgrade.
        assert "replicas" not in component(docs, "Deployment", name)["spec"]
    # Triton scales on the queue-time ratio (Triton's counters) and on the llm gauge; the orchestrator on its
    # own gauge, read from the live registry.
    triton_rules = [
        r
        for r in rules
        if exposed_name(r, next(iter(series_in(r["seriesQuery"]))))
        in hpa_pod_metrics(component(docs, "HorizontalPodAutoscaler", "triton"))
    ]
    triton_series = set().union(*(series_in(r["metricsQuery"]) for r in triton_rules))
    assert {m.TRITON_QUEUE_DURATION_US, m.TRITON_REQUEST_SUCCESS} <= triton_series
    assert m.LLM_ACTIVE_SEQUENCES in hpa_pod_metrics(component(docs, "HorizontalPodAutoscaler", "triton"))
    assert hpa_pod_metrics(component(docs, "HorizontalPodAutoscaler", "orchestrator")) == [m.ACTIVE_STREAMS]
    assert m.ACTIVE_STREAMS in own


def test_queue_rule_follows_values(rendered) -> None:
    q = chart_values(VALUES_SETS["autoscaling"])["triton"]["autoscaling"]["queueTime"]
    (rule,) = [
        r for r in adapter_rules(rendered[("autoscaling", KV)]) if m.TRITON_QUEUE_DURATION_US in r["seriesQuery"]
    ]
    assert f'model="{q["model"]}"' in rule["metricsQuery"]
    assert f"[{q['window']}]" in rule["metricsQuery"]
    (default_rule,) = [
        r for r in adapter_rules(rendered[("default", KV)]) if m.TRITON_QUEUE_DURATION_US in r["seriesQuery"]
    ]
    assert "model=" not in default_rule["metricsQuery"]


def test_scale_down_is_stabilized(rendered) -> None:
    values = chart_values(VALUES_SETS["autoscaling"])
    docs = rendered[("autoscaling", KV)]
    for name in ("triton", "orchestrator"):
        spec = component(docs, "HorizontalPodAutoscaler", name)["spec"]
        window = spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
        assert window == values[name]["autoscaling"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"]
        assert window >= 300  # new GPU nodes take minutes: do not give capacity back on a short lull
        assert 1 <= spec["minReplicas"] <= spec["maxReplicas"]


def test_no_hpa_unless_enabled(rendered) -> None:
    docs = rendered[("default", KV)]
    assert not by_kind(docs, "HorizontalPodAutoscaler")
    replicas = component(docs, "Deployment", "triton")["spec"]["replicas"]
    assert replicas == chart_values()["triton"]["replicaCount"]


def test_exposed_name_is_not_vacuous() -> None:
    """The helper above must reject a rule that does not match and apply renames."""
    rule = {"name": {"matches": "^a_total$", "as": "b"}}
    assert exposed_name(rule, "a_total") == "b"
    assert exposed_name(rule, "c") == ""
    assert series_in('sum(x{<<.LabelMatchers>>}) / y{a="b"}') == {"x", "y"}
