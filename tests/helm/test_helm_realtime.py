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


def _allows(policy: dict, direction: str, peer_labels: dict, port: int) -> bool:
    """Whether one of the policy's rules in `direction` (ingress/egress) admits pods labelled `peer_labels` on
    `port` (podSelector matchLabels peers only, as this chart writes them)."""
    key = "from" if direction == "ingress" else "to"
    for rule in policy["spec"].get(direction, []):
        ports = [p["port"] for p in rule.get("ports", [])]
        peers = rule.get(key)
        if ports and port not in ports:
            continue
        if peers is None:
            return True
        for peer in peers:
            labels = peer.get("podSelector", {}).get("matchLabels")
            if labels is not None and "namespaceSelector" not in peer and labels.items() <= peer_labels.items():
                return True
    return False


def _selected(docs: list[dict], labels: dict) -> list[dict]:
    return [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy" and d["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]


def test_network_policies_let_the_gateway_reach_the_orchestrator(helm: Helm, tmp_path):
    # clientsFrom set: the orchestrator's own policy admits only those clients; the gateway must still get in.
    only = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}}}]
    docs = _render(helm, tmp_path, {"realtime": {"enabled": True}, "networkPolicy": {"clientsFrom": only}})
    rt = _find(docs, "Deployment", f"{RELEASE}-moss-speech-realtime")
    orch = _find(docs, "Deployment", f"{RELEASE}-moss-speech-orchestrator")
    rt_labels = rt["spec"]["template"]["metadata"]["labels"]
    orch_labels = orch["spec"]["template"]["metadata"]["labels"]
    port = next(
        p["containerPort"] for p in orch["spec"]["template"]["spec"]["containers"][0]["ports"] if p["name"] == "grpc"
    )
    target = rt["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"]
    assert target.endswith(f":{port}")
    ingress = [p for p in _selected(docs, orch_labels) if "Ingress" in p["spec"]["policyTypes"]]
    assert ingress and any(_allows(p, "ingress", rt_labels, port) for p in ingress)
    # ...and a stranger pod is not admitted by the policy added for the gateway
    added = _find(docs, "NetworkPolicy", f"{RELEASE}-moss-speech-orchestrator-from-realtime")
    assert not _allows(added, "ingress", {"app": "other"}, port)
    # The gateway's egress: DNS and the orchestrator's gRPC port, not Triton.
    own = [p for p in _selected(docs, rt_labels) if "Egress" in p["spec"]["policyTypes"]]
    assert own and all(_allows(p, "egress", orch_labels, port) for p in own)
    triton = _find(docs, "Deployment", f"{RELEASE}-moss-speech-triton")
    triton_labels = triton["spec"]["template"]["metadata"]["labels"]
    assert not any(_allows(p, "egress", triton_labels, 8001) for p in own)
    # The public WebSocket port is open to everyone.
    assert any(_allows(p, "ingress", {}, 8080) for p in own)


def test_network_policies_off_render_none_for_the_gateway(helm: Helm, tmp_path):
    docs = _render(helm, tmp_path, {"realtime": {"enabled": True}, "networkPolicy": {"enabled": False}})
    assert not [d for d in docs if d["kind"] == "NetworkPolicy"]


def _gateway(docs: list[dict]) -> tuple[dict, dict, dict]:
    dep = _find(docs, "Deployment", f"{RELEASE}-moss-speech-realtime")
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    return pod, c, env


def test_realtime_calls_a_tls_orchestrator_with_its_ca(helm: Helm, tmp_path):
    """The orchestrator serves TLS by default: the gateway mounts the CA read-only and verifies it; under mTLS it
    presents its own client certificate; with a plaintext orchestrator it mounts nothing."""
    pod, c, env = _gateway(_render(helm, tmp_path, {"realtime": {"enabled": True}}))
    assert env["MOSS_REALTIME_SERVICE_TLS_CA_FILE"] == "/etc/moss-realtime/service-ca/ca.crt"
    mount = next(m for m in c["volumeMounts"] if m["name"] == "service-ca")
    assert mount["readOnly"] and mount["mountPath"] == "/etc/moss-realtime/service-ca"
    vol = next(v for v in pod["volumes"] if v["name"] == "service-ca")
    assert vol["secret"]["secretName"] == f"{RELEASE}-moss-speech-orchestrator-tls"
    assert "MOSS_REALTIME_SERVICE_TLS_CERT_FILE" not in env

    pod, c, env = _gateway(
        _render(
            helm,
            tmp_path,
            {
                "realtime": {
                    "enabled": True,
                    "serviceTLS": {
                        "caSecretName": "corp-ca",
                        "caKey": "root.pem",
                        "serverName": "api.example.com",
                        "clientSecretName": "gateway-client",
                    },
                }
            },
        )
    )
    assert env["MOSS_REALTIME_SERVICE_TLS_CA_FILE"] == "/etc/moss-realtime/service-ca/root.pem"
    assert env["MOSS_REALTIME_SERVICE_TLS_SERVER_NAME"] == "api.example.com"
    assert env["MOSS_REALTIME_SERVICE_TLS_CERT_FILE"] == "/etc/moss-realtime/client-tls/tls.crt"
    vols = {v["name"]: v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert vols == {"service-ca": "corp-ca", "client-tls": "gateway-client"}

    pod, c, env = _gateway(
        _render(helm, tmp_path, {"realtime": {"enabled": True}, "orchestrator": {"settings": {"plaintext": True}}})
    )
    assert not any(k.startswith("MOSS_REALTIME_SERVICE_TLS") for k in env)
    assert not any(v["name"] in ("service-ca", "client-tls") for v in pod["volumes"])
