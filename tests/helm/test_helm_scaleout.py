"""Chart scale-out cases, each rendered: the orchestrator reaches every Triton pod (headless + dns:///), its
liveness ignores Triton, strategy types render only their own fields, rollouts have a progress deadline."""

from __future__ import annotations

from pathlib import Path

import yaml
from helm_support import KUBE_VERSIONS, VALUES_SETS, component


def render_with(helm, tmp_path: Path, values: dict) -> list[dict]:
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    return helm.render([VALUES_SETS["default"], f])


def orchestrator_container(docs):
    deploy = component(docs, "Deployment", "orchestrator")
    return next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "orchestrator"), deploy


def test_orchestrator_balances_over_every_triton_pod(rendered) -> None:
    docs = rendered[("default", KUBE_VERSIONS[-1])]
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    triton = component(docs, "Service", "triton")["metadata"]["name"]
    headless = services[f"{triton}-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    c, _ = orchestrator_container(docs)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MOSS_SPEECH_TRITON_URL"].startswith(f"dns:///{triton}-headless.")


def test_liveness_is_process_health_and_readiness_follows_triton(rendered) -> None:
    for (_, _), docs in rendered.items():
        c, _ = orchestrator_container(docs)
        assert c["livenessProbe"]["grpc"]["service"] == "liveness"
        assert c["startupProbe"]["grpc"]["service"] == "liveness"
        assert c["readinessProbe"]["grpc"]["service"] != "liveness"


def test_recreate_strategy_renders_no_rolling_update_and_deadlines(helm, tmp_path) -> None:
    docs = render_with(helm, tmp_path, {"triton": {"strategy": {"type": "Recreate"}}})
    triton = component(docs, "Deployment", "triton")
    assert triton["spec"]["strategy"] == {"type": "Recreate"}
    assert triton["spec"]["progressDeadlineSeconds"] >= 1800
    orch = component(docs, "Deployment", "orchestrator")
    assert orch["spec"]["strategy"]["type"] == "RollingUpdate" and "rollingUpdate" in orch["spec"]["strategy"]
    assert orch["spec"]["progressDeadlineSeconds"] > 0
