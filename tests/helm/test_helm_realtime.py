"""The chart's realtime gateway: off by default; when enabled a Deployment with HTTP probes on /healthz and
/readyz, a Service on its port, the gRPC target pointed at the orchestrator Service, and an HPA on open WebSockets
that the prometheus-adapter rules serve."""

from __future__ import annotations

import yaml
from helm_support import CHART, RELEASE, Helm

from moss_speech.services.realtime.metrics import ACTIVE_CONNECTIONS


def _render(helm: Helm, tmp_path, values: dict) -> list[dict]:
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    return helm.render([f])


def _find(docs: list[dict], kind: str, name: str) -> dict | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def test_realtime_is_off_by_default(helm: Helm, tmp_path):
    docs = _render(helm, tmp_path, {})
    assert not any("realtime" in d["metadata"]["name"] for d in docs if d["kind"] != "ConfigMap")


def test_realtime_renders_deployment_service_probes_and_hpa(helm: Helm, tmp_path):
    docs = _render(
        helm,
        tmp_path,
        {
            "realtime": {
                "enabled": True,
                "port": 8443,
                "maxConnections": 40,
                "autoscaling": {"enabled": True, "targetActiveConnections": 20},
            },
            "monitoring": {"adapterRules": {"enabled": True}},
        },
    )
    name = f"{RELEASE}-moss-speech-realtime"
    dep = _find(docs, "Deployment", name)
    assert dep is not None, [d["metadata"]["name"] for d in docs]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["moss-speech", "realtime"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MOSS_REALTIME_SERVICE_URL"] == f"{RELEASE}-moss-speech-orchestrator:50051"
    assert env["MOSS_REALTIME_PORT"] == "8443" and env["MOSS_REALTIME_MAX_CONNECTIONS"] == "40"
    assert c["ports"] == [{"name": "http", "containerPort": 8443, "protocol": "TCP"}]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "replicas" not in dep["spec"]  # the HPA owns the count
    svc = _find(docs, "Service", name)
    assert svc["spec"]["ports"][0]["port"] == 8443 and svc["spec"]["ports"][0]["targetPort"] == "http"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    hpa = _find(docs, "HorizontalPodAutoscaler", name)
    metric = hpa["spec"]["metrics"][0]["pods"]
    assert metric["metric"]["name"] == ACTIVE_CONNECTIONS and metric["target"]["averageValue"] == "20"
    rules = next(d for d in docs if d["kind"] == "ConfigMap" and "adapter" in d["metadata"]["name"])
    assert ACTIVE_CONNECTIONS in rules["data"]["config.yaml"]


def test_realtime_values_are_schema_checked(helm: Helm, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump({"realtime": {"enabled": True, "port": 0}}))
    proc = helm.run(*helm.template_args([f]), check=False)
    assert proc.returncode != 0 and "port" in proc.stderr
    assert (CHART / "templates" / "realtime.yaml").is_file()
