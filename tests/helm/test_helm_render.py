"""The chart lints strictly, renders for every shipped values set, and every manifest is valid Kubernetes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from helm_support import CHART, KUBE_VERSIONS, VALUES_SETS, by_kind
from kubernetes_validate import utils as kv

# Kinds from CRDs: kubernetes-validate ships only built-in schemas, so these are checked by
# `check_monitor` below instead of by strict schema validation.
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}  # rules: tests/helm/test_helm_observability.py


def test_values_sets_shipped() -> None:
    assert {"default", "gpu", "autoscaling", "monitoring"} <= set(VALUES_SETS)


@pytest.mark.parametrize("values_set", sorted(VALUES_SETS))
def test_lint_strict(helm, values_set: str) -> None:
    proc = helm.run("lint", "--strict", str(CHART), "-f", str(VALUES_SETS[values_set]), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
@pytest.mark.parametrize("values_set", sorted(VALUES_SETS))
def test_manifests_validate_strict(rendered, values_set: str, kube_version: str) -> None:
    docs = rendered[(values_set, kube_version)]
    assert docs
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            # Honest about the gap: assert the schema really is absent (so this branch is not hiding a
            # validatable kind), then check the fields ourselves.
            with pytest.raises(kv.SchemaNotFoundError):
                kv.validate(doc, kube_version, strict=True)
            if doc["kind"] != "PrometheusRule":
                check_monitor(doc, docs)
            continue
        try:
            kv.validate(doc, kube_version, strict=True)
        except kv.ValidationError as e:
            pytest.fail(f"{name} is not valid for Kubernetes {kube_version}: {'.'.join(map(str, e.path))}: {e.message}")


def check_monitor(doc: dict, docs: list[dict]) -> None:
    """ServiceMonitor / PodMonitor (prometheus-operator v1): the fields we use, and that they point at a
    Service / pod template that exists and exposes a port named like the endpoint."""
    spec = doc["spec"]
    selector = spec["selector"]["matchLabels"]
    if doc["kind"] == "ServiceMonitor":
        assert set(spec) == {"selector", "endpoints"}
        targets = [s for s in by_kind(docs, "Service").values() if selector.items() <= s["metadata"]["labels"].items()]
        port_names = {p["name"] for s in targets for p in s["spec"]["ports"]}
        endpoints = spec["endpoints"]
    else:
        assert set(spec) == {"selector", "podMetricsEndpoints"}
        targets = [
            d
            for d in by_kind(docs, "Deployment").values()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        port_names = {
            p["name"] for d in targets for c in d["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])
        }
        endpoints = spec["podMetricsEndpoints"]
    assert targets, f"{doc['kind']} {doc['metadata']['name']} selects nothing"
    for ep in endpoints:
        assert set(ep) <= {"port", "path", "interval"}
        assert ep["port"] in port_names
        assert ep["path"] == "/metrics"
        assert re.fullmatch(r"[0-9]+(ms|s|m)", ep["interval"])


def test_monitors_toggle(rendered) -> None:
    assert not by_kind(rendered[("default", KUBE_VERSIONS[-1])], "ServiceMonitor")
    docs = rendered[("monitoring", KUBE_VERSIONS[-1])]
    assert len(by_kind(docs, "ServiceMonitor")) == 2
    assert len(by_kind(docs, "PodMonitor")) == 2


# --- values that break the schema (or the chart's own checks) fail at install -----------------------------

BAD_VALUES = {
    "replica count as text": ({"triton": {"replicaCount": "two"}}, "/triton/replicaCount"),
    "unknown top-level key": ({"trition": {}}, "trition"),
    "unknown setting (typo)": ({"orchestrator": {"settings": {"temprature": 0.7}}}, "temprature"),
    "setting out of range": ({"orchestrator": {"settings": {"top_p": 1.5}}}, "/orchestrator/settings/top_p"),
    "setting of wrong type": (
        {"orchestrator": {"settings": {"max_sessions": "many"}}},
        "/orchestrator/settings/max_sessions",
    ),
    "log level not allowed": (
        {"orchestrator": {"settings": {"log_level": "LOUD"}}},
        "/orchestrator/settings/log_level",
    ),
    "bad repository source": ({"modelRepository": {"source": "download"}}, "/modelRepository/source"),
    "port out of range": ({"triton": {"ports": {"grpc": 70000}}}, "/triton/ports/grpc"),
    "build without a volume": ({"modelRepository": {"volume": {"enabled": False}}}, "volume.enabled"),
    "autoscaling with no metric": (
        {
            "triton": {
                "autoscaling": {"enabled": True, "queueTime": {"enabled": False}, "activeSequences": {"enabled": False}}
            }
        },
        "queueTime.enabled or activeSequences.enabled",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_fail(helm, tmp_path: Path, case: str) -> None:
    values, expected_in_error = BAD_VALUES[case]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(values))
    proc = helm.run(*helm.template_args([bad]), check=False)
    assert proc.returncode != 0, f"{case}: rendered although it should fail"
    assert expected_in_error in proc.stderr, proc.stderr


def test_schema_refuses_while_defaults_pass(helm, tmp_path: Path) -> None:
    """Control for the cases above: the same mechanism accepts a valid override."""
    ok = tmp_path / "ok.yaml"
    ok.write_text(yaml.safe_dump({"triton": {"replicaCount": 3}, "orchestrator": {"settings": {"top_p": 0.5}}}))
    helm.run(*helm.template_args([ok]))
