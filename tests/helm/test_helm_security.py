"""The chart's security objects, rendered with the real helm: TLS and API-key Secrets mounted read-only (as
directories, so rotations reach running pods), probes on the plaintext health-only port, reflection off, metrics
never on the public Service, loadBalancerSourceRanges, a gRPC Ingress with TLS, a cert-manager Certificate, mTLS,
and NetworkPolicy egress rules."""

from __future__ import annotations

import yaml
from helm_support import CHART, RELEASE, Helm

from moss_speech.services.auth import hash_key
from moss_speech.services.settings import ServiceSettings

ORCH = f"{RELEASE}-moss-speech-orchestrator"


def _render(helm: Helm, tmp_path, values: dict) -> list[dict]:
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    return helm.render([f])


def _find(docs: list[dict], kind: str, name: str) -> dict | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def _orchestrator(docs: list[dict]) -> tuple[dict, dict]:
    dep = _find(docs, "Deployment", ORCH)
    return dep["spec"]["template"]["spec"], dep["spec"]["template"]["spec"]["containers"][0]


def test_defaults_are_tls_keys_no_reflection_probes_on_health_port(helm: Helm, tmp_path) -> None:
    docs = _render(helm, tmp_path, {})
    pod, c = _orchestrator(docs)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["MOSS_SPEECH_PLAINTEXT"] == "false" and env["MOSS_SPEECH_AUTH"] == "api_keys"
    assert env["MOSS_SPEECH_REFLECTION"] == "false"
    settings = ServiceSettings(
        **{
            k.removeprefix("MOSS_SPEECH_").lower(): v
            for k, v in env.items()
            if k.startswith("MOSS_SPEECH_") and v is not None
        },  # redis_url: a Secret's
        redis_url="redis://from-secret:6379/0",
    )
    assert settings.health_port == 8081
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["health"] == 8081
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["grpc"]["port"] == 8081
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for name, path, secret in (
        ("tls", "/etc/moss-speech/tls", f"{ORCH}-tls"),
        ("api-keys", "/etc/moss-speech/keys", f"{ORCH}-api-keys"),
    ):
        assert mounts[name]["readOnly"] is True and mounts[name]["mountPath"] == path
        assert "subPath" not in mounts[name]  # a subPath mount never sees a rotated Secret
        assert volumes[name]["secret"]["secretName"] == secret
    assert {i["path"] for i in volumes["tls"]["secret"]["items"]} == {"tls.crt", "tls.key"}


def test_metrics_port_never_on_the_public_service(helm: Helm, tmp_path) -> None:
    docs = _render(
        helm,
        tmp_path,
        {"orchestrator": {"service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["203.0.113.0/24"]}}},
    )
    public = _find(docs, "Service", ORCH)
    assert public["spec"]["type"] == "LoadBalancer"
    assert public["spec"]["loadBalancerSourceRanges"] == ["203.0.113.0/24"]
    assert [p["name"] for p in public["spec"]["ports"]] == ["grpc"]
    headless = _find(docs, "Service", f"{ORCH}-headless")
    assert [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]
    metrics = _find(docs, "Service", f"{ORCH}-metrics")
    assert metrics["spec"]["type"] == "ClusterIP" and [p["name"] for p in metrics["spec"]["ports"]] == ["metrics"]
    for svc in (d for d in docs if d["kind"] == "Service"):
        assert not any(p["name"] == "health" for p in svc["spec"]["ports"])


def test_api_key_secret_from_hashes_only(helm: Helm, tmp_path) -> None:
    line = f"ci:{hash_key('secret-key')}"
    docs = _render(helm, tmp_path, {"security": {"apiKeys": {"hashes": [line]}}})
    secret = _find(docs, "Secret", f"{ORCH}-api-keys")
    assert secret["stringData"]["api-keys"].strip() == line
    assert "secret-key" not in yaml.safe_dump_all(docs)
    # an existing Secret is mounted instead, none created
    docs = _render(helm, tmp_path, {"security": {"apiKeys": {"secretName": "mine", "hashes": [line]}}})
    assert _find(docs, "Secret", f"{ORCH}-api-keys") is None
    pod, _ = _orchestrator(docs)
    assert next(v for v in pod["volumes"] if v["name"] == "api-keys")["secret"]["secretName"] == "mine"


def test_bad_key_hash_refused_by_the_schema(helm: Helm, tmp_path) -> None:
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump({"security": {"apiKeys": {"hashes": ["ci:the-raw-key"]}}}))
    proc = helm.run(*helm.template_args([f]), check=False)
    assert proc.returncode != 0 and "hashes" in proc.stderr


def test_mtls_mounts_the_client_ca(helm: Helm, tmp_path) -> None:
    docs = _render(
        helm,
        tmp_path,
        {
            "orchestrator": {"settings": {"tls_client_ca_file": "/etc/moss-speech/client-ca/ca.crt"}},
            "security": {"clientCA": {"secretName": "clients-ca"}},
        },
    )
    pod, c = _orchestrator(docs)
    mount = next(m for m in c["volumeMounts"] if m["name"] == "client-ca")
    assert mount["readOnly"] is True and mount["mountPath"] == "/etc/moss-speech/client-ca"
    assert next(v for v in pod["volumes"] if v["name"] == "client-ca")["secret"]["secretName"] == "clients-ca"


def test_plaintext_without_keys_mounts_nothing(helm: Helm, tmp_path) -> None:
    docs = _render(helm, tmp_path, {"orchestrator": {"settings": {"plaintext": True, "auth": "none"}}})
    _, c = _orchestrator(docs)
    assert {m["name"] for m in c["volumeMounts"]} == {"tmp"}


def test_grpc_ingress_with_tls_and_cert_manager_certificate(helm: Helm, tmp_path) -> None:
    docs = _render(
        helm,
        tmp_path,
        {
            "ingress": {
                "enabled": True,
                "host": "speech.example.com",
                "tlsSecretName": "speech-tls",
                "sourceRanges": ["198.51.100.0/24"],
            },
            "security": {
                "tls": {
                    "certManager": {
                        "enabled": True,
                        "issuerRef": {"name": "ca", "kind": "ClusterIssuer"},
                        "dnsNames": ["speech.internal"],
                    }
                }
            },
        },
    )
    ing = _find(docs, "Ingress", ORCH)
    ann = ing["metadata"]["annotations"]
    assert ann["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    assert ann["nginx.ingress.kubernetes.io/whitelist-source-range"] == "198.51.100.0/24"
    assert ing["spec"]["tls"] == [{"hosts": ["speech.example.com"], "secretName": "speech-tls"}]
    backend = ing["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": ORCH, "port": {"name": "grpc"}}
    cert = _find(docs, "Certificate", ORCH)
    assert cert["spec"]["secretName"] == f"{ORCH}-tls"
    assert "speech.internal" in cert["spec"]["dnsNames"]


def test_network_policy_limits_orchestrator_egress(helm: Helm, tmp_path) -> None:
    extra = {"to": [{"ipBlock": {"cidr": "10.9.0.0/16"}}], "ports": [{"port": 4318, "protocol": "TCP"}]}
    docs = _render(helm, tmp_path, {"networkPolicy": {"egressExtra": [extra]}})
    np = _find(docs, "NetworkPolicy", ORCH)
    assert "Egress" in np["spec"]["policyTypes"]
    rules = np["spec"]["egress"]
    assert any(p["port"] == 53 for r in rules for p in r["ports"])
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    triton_rule = next(
        r
        for r in rules
        if any("podSelector" in t for t in r["to"]) and r["ports"][0]["port"] == values["triton"]["ports"]["grpc"]
    )
    assert triton_rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "triton"
    assert extra in rules
    redis_rule = next(r for r in rules if r["ports"] == [{"port": 6379, "protocol": "TCP"}])  # the bundled store
    assert redis_rule["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "redis"
    assert len(rules) == 4  # nothing else leaves the pod
