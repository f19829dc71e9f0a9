"""The chart's observability objects: dashboard ConfigMap, PrometheusRule (checked by promtool), runbook links,
tracing wiring. Their queries are checked against live data in tests/observability/."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helm_support import CHART, REPO, by_kind

MONITORING = CHART / "ci" / "monitoring-values.yaml"
RUNBOOK = REPO / "docs" / "runbook.md"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")


def test_dashboard_configmap_carries_the_json_and_sidecar_label(helm) -> None:
    docs = helm.render([])
    cm = next(d for d in by_kind(docs, "ConfigMap").values() if d["metadata"]["name"].endswith("-dashboard"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((CHART / "dashboards" / "moss-speech.json").read_text())
    assert json.loads(cm["data"]["moss-speech.json"]) == shipped
    titles = " ".join(p["title"].lower() for p in shipped["panels"])
    for needed in (
        "time to first audio",
        "real-time factor",
        "active streams",
        "sessions",
        "requests by status",
        "queue time",
        "compute time",
        "active sequences",
        "kv slot",
        "gpu utilisation",
        "gpu memory",
        "errors by code",
    ):
        assert needed in titles, needed
    ids = [p["id"] for p in shipped["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_off(helm, tmp_path: Path) -> None:
    values = tmp_path / "v.yaml"
    values.write_text("monitoring:\n  dashboard:\n    enabled: false\n")
    assert not [d for d in helm.render([values]) if d["metadata"]["name"].endswith("-dashboard")]


def test_alerts_pass_promtool_and_link_the_runbook(helm, tmp_path: Path) -> None:
    docs = helm.render([MONITORING])
    (rule,) = by_kind(docs, "PrometheusRule").values()
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) not installed")
    proc = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    anchors = {_anchor(line[3:]) for line in RUNBOOK.read_text().splitlines() if line.startswith("## ")}
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert {r["alert"] for r in alerts} == {
        "MossSpeechTimeToFirstAudioHigh",
        "MossSpeechErrorRatioHigh",
        "MossSpeechTritonNotReady",
        "MossSpeechTritonQueueGrowing",
        "MossSpeechKVSlotsSaturated",
    }
    for r in alerts:
        url = r["annotations"]["runbook_url"]
        assert url.split("#")[0].endswith("docs/runbook.md") and url.split("#")[1] in anchors, url
        assert 'namespace="speech"' in r["expr"]


def test_alerts_need_the_toggle(rendered) -> None:
    assert not by_kind(rendered[("default", "1.33.0")], "PrometheusRule")


def test_tracing_wires_both_sides(helm) -> None:
    docs = helm.render([MONITORING])
    deployments = by_kind(docs, "Deployment")
    orch = next(d for n, d in deployments.items() if n.endswith("-orchestrator"))
    env = {e["name"]: e.get("value") for e in orch["spec"]["template"]["spec"]["containers"][0]["env"]}
    endpoint = yaml.safe_load(MONITORING.read_text())["tracing"]["otlpEndpoint"]
    assert env["MOSS_SPEECH_OTLP_ENDPOINT"] == endpoint
    triton = next(d for n, d in deployments.items() if n.endswith("-triton"))
    assert f"--trace-otlp-url={endpoint}" in triton["spec"]["template"]["spec"]["containers"][0]["args"]


def test_tracing_off_by_default(helm) -> None:
    docs = helm.render([])
    orch = next(d for n, d in by_kind(docs, "Deployment").items() if n.endswith("-orchestrator"))
    env = {e["name"]: e.get("value") for e in orch["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MOSS_SPEECH_OTLP_ENDPOINT"] == ""
    triton = next(d for n, d in by_kind(docs, "Deployment").items() if n.endswith("-triton"))
    assert not any("trace" in a for a in triton["spec"]["template"]["spec"]["containers"][0]["args"])


def test_tracing_without_endpoint_fails(helm, tmp_path: Path) -> None:
    values = tmp_path / "v.yaml"
    values.write_text("tracing:\n  enabled: true\n")
    proc = helm.run(*helm.template_args([values]), check=False)
    assert proc.returncode != 0 and "otlpEndpoint" in proc.stderr
