"""What the rendered workloads promise: GPU scheduling, probes, ports, settings as env, non-root, policies."""

from __future__ import annotations

import math
import os
import re

import pytest
from helm_support import KUBE_VERSIONS, VALUES_SETS, by_kind, chart_values, component

from moss_speech.services.settings import ServiceSettings, env_var

KV = KUBE_VERSIONS[-1]


def pod(deploy: dict) -> dict:
    return deploy["spec"]["template"]["spec"]


def container(deploy: dict, name: str) -> dict:
    return next(c for c in pod(deploy)["containers"] if c["name"] == name)


def env_of(c: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def claim_of(deploy: dict) -> str:
    models = next(v for v in pod(deploy)["volumes"] if v["name"] == "models")
    return models["persistentVolumeClaim"]["claimName"]


def seconds(probe: dict) -> int:
    return probe["periodSeconds"] * probe["failureThreshold"]


# --- Triton ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values_set", sorted(VALUES_SETS))
def test_triton_on_gpu_with_health_probes(rendered, values_set: str) -> None:
    values = chart_values(VALUES_SETS[values_set])
    deploy = component(rendered[(values_set, KV)], "Deployment", "triton")
    spec, triton = pod(deploy), container(deploy, "triton")

    assert int(triton["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule" for t in spec["tolerations"])

    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == values["triton"]["ports"]
    # The port flags reach the server (both the launcher and tritonserver take --*-port=N).
    for name, number in ports.items():
        assert f"--{name}-port={number}" in triton["args"]

    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    # Loading a 9B LLM and its engines takes minutes: the startup budget must cover it, unlike liveness.
    assert seconds(triton["startupProbe"]) >= 300 > seconds(triton["livenessProbe"])

    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": values["triton"]["shmSize"]}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in triton["volumeMounts"]


def test_triton_command_default_is_the_launcher(rendered) -> None:
    values = chart_values()
    triton = container(component(rendered[("default", KV)], "Deployment", "triton"), "triton")
    assert triton["command"][:2] == ["moss-speech", "triton"]
    repo_arg = triton["command"][triton["command"].index("--repo") + 1]
    # Kubernetes expands $(VAR) in commands from the container's env.
    var = re.fullmatch(r"\$\((\w+)\)", repo_arg).group(1)
    repo = values["modelRepository"]
    assert env_of(triton)[var] == f"{repo['volume']['mountPath']}/{repo['path']}"  # relative: under the mount


def test_triton_ports_match_the_launcher_defaults() -> None:
    """The chart's Triton ports are the launcher's defaults (the Triton engineer's module), when present."""
    launcher = pytest.importorskip("moss_speech.model_repository.launcher")
    ports = chart_values()["triton"]["ports"]
    assert (ports["http"], ports["grpc"], ports["metrics"]) == tuple(launcher.DEFAULT_PORTS)


def test_build_mode_runs_the_builder_into_the_served_repository(rendered) -> None:
    values = chart_values()
    deploy = component(rendered[("default", KV)], "Deployment", "triton")
    (init,) = component(rendered[("default", KV)], "Job", "build")["spec"]["template"]["spec"]["containers"]
    args = dict(a.removeprefix("--").split("=", 1) for a in init["args"])
    build = values["modelRepository"]["build"]
    mount = values["modelRepository"]["volume"]["mountPath"]
    assert "moss-speech build" in init["command"][-2]  # sh -c: under the volume's lock, then the revision mark
    assert args == {
        "checkpoint": f"{mount}/{build['checkpoint']}",
        "codec": f"{mount}/{build['codec']}",
        "target": "gpu",
        "out": f"{mount}/{values['modelRepository']['path']}",
    }
    # GPU engines are built on the GPU they run on; the cache lives on the PVC, which Triton reads only.
    assert init["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert args["out"].startswith(mount + "/")
    triton = container(deploy, "triton")
    assert {"name": "models", "mountPath": mount, "readOnly": True} in triton["volumeMounts"]
    claim = claim_of(deploy)
    assert claim in by_kind(rendered[("default", KV)], "PersistentVolumeClaim")


def test_prebuilt_mode_serves_without_building(rendered) -> None:
    values = chart_values(VALUES_SETS["gpu"])
    deploy = component(rendered[("gpu", KV)], "Deployment", "triton")
    assert "initContainers" not in pod(deploy)
    triton = container(deploy, "triton")
    assert triton["command"] == values["triton"]["command"]
    assert pod(deploy)["runtimeClassName"] == "nvidia"
    assert pod(deploy)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    claim = claim_of(deploy)
    assert claim == values["modelRepository"]["volume"]["existingClaim"]
    assert not by_kind(rendered[("gpu", KV)], "PersistentVolumeClaim")


# --- orchestrator ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("values_set", sorted(VALUES_SETS))
def test_orchestrator_env_is_the_settings(rendered, monkeypatch, values_set: str) -> None:
    """Rendered MOSS_SPEECH_* env, parsed by ServiceSettings itself, gives back the values' settings."""
    docs = rendered[(values_set, KV)]
    values = chart_values(VALUES_SETS[values_set])["orchestrator"]["settings"]
    orch = container(component(docs, "Deployment", "orchestrator"), "orchestrator")
    env = {k: v for k, v in env_of(orch).items() if k.startswith("MOSS_SPEECH_")}
    # Secret-held settings (the Redis URL): the rendered Secret's value.
    secrets = by_kind(docs, "Secret")
    for e in orch["env"]:
        if "secretKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secrets[ref["name"]]["stringData"][ref["key"]]

    for k in list(os.environ):
        if k.startswith("MOSS_SPEECH_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = ServiceSettings()

    assert set(env) == {env_var(f) for f in ServiceSettings.model_fields}
    for key, value in values.items():
        if key == "health_port" and not value:  # 0 = the chart's orchestrator.healthPort
            value = chart_values(VALUES_SETS[values_set])["orchestrator"]["healthPort"]
        if key == "otlp_endpoint" and not value and chart_values(VALUES_SETS[values_set])["tracing"]["enabled"]:
            value = chart_values(VALUES_SETS[values_set])["tracing"]["otlpEndpoint"]
        assert getattr(settings, key) == value, key
    if "triton_url" not in values:
        service = component(docs, "Service", "triton")
        port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
        target = f"{service['metadata']['name']}:{port}"
        if f"{service['metadata']['name']}-headless" in by_kind(docs, "Service"):  # dns:/// over every pod
            target = f"dns:///{service['metadata']['name']}-headless.speech.svc:{port}"
        assert settings.triton_url == target

    # Ports, probes and Services follow the settings.
    ports = {p["name"]: p["containerPort"] for p in orch["ports"]}
    assert ports == {"grpc": settings.grpc_port, "metrics": settings.metrics_port, "health": settings.health_port}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):  # the plaintext health-only port (TLS on grpc)
        assert orch[probe]["grpc"]["port"] == settings.health_port
    assert orch["command"] == ["moss-speech", "serve"]


@pytest.mark.parametrize("values_set", ["default", "monitoring"])
def test_termination_grace_covers_drain(rendered, values_set: str) -> None:
    values = chart_values(VALUES_SETS[values_set])["orchestrator"]
    deploy = component(rendered[(values_set, KV)], "Deployment", "orchestrator")
    orch = container(deploy, "orchestrator")
    sleep = int(orch["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert sleep == values["preStopSleepSeconds"]
    drain = math.ceil(values["settings"]["drain_seconds"])
    assert pod(deploy)["terminationGracePeriodSeconds"] >= sleep + drain


# --- services, security, policies --------------------------------------------------------------------------


@pytest.mark.parametrize("values_set", sorted(VALUES_SETS))
def test_services_reach_named_ports_over_h2c(rendered, values_set: str) -> None:
    docs = rendered[(values_set, KV)]
    deployments = by_kind(docs, "Deployment").values()
    for svc in by_kind(docs, "Service").values():
        selected = [
            d
            for d in deployments
            if svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, svc["metadata"]["name"]
        names = {p["name"] for c in pod(selected[0])["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names
            if port["name"] == "grpc":
                assert port["appProtocol"] in ("kubernetes.io/h2c", "grpc", "h2c")
        if svc["metadata"]["name"].endswith("-headless"):
            assert svc["spec"]["clusterIP"] == "None"
    headless = chart_values(VALUES_SETS[values_set])["orchestrator"]["service"]["headless"]
    assert any(name.endswith("orchestrator-headless") for name in by_kind(docs, "Service")) == headless


@pytest.mark.parametrize("values_set", sorted(VALUES_SETS))
def test_pods_run_as_non_root(rendered, values_set: str) -> None:
    for deploy in by_kind(rendered[(values_set, KV)], "Deployment").values():
        spec = pod(deploy)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] != 0
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
            assert "memory" in c["resources"]["limits"]


def test_disruption_budgets_select_each_workload(rendered) -> None:
    docs = rendered[("default", KV)]
    for name in ("triton", "orchestrator"):
        pdb = component(docs, "PodDisruptionBudget", name)
        labels = component(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("values_set", ["default", "monitoring"])
def test_network_policy_only_orchestrator_reaches_triton_inference(rendered, values_set: str) -> None:
    docs = rendered[(values_set, KV)]
    values = chart_values(VALUES_SETS[values_set])
    triton_np = component(docs, "NetworkPolicy", "triton")
    orch_labels = component(docs, "Deployment", "orchestrator")["spec"]["template"]["metadata"]["labels"]
    grpc = values["triton"]["ports"]["grpc"]
    rules = [r for r in triton_np["spec"]["ingress"] if any(p["port"] == grpc for p in r["ports"])]
    assert len(rules) == 1 and len(rules[0]["from"]) == 1
    assert rules[0]["from"][0]["podSelector"]["matchLabels"].items() <= orch_labels.items()
    metrics_rule = next(
        r
        for r in triton_np["spec"]["ingress"]
        if [p["port"] for p in r["ports"]] == [values["triton"]["ports"]["metrics"]]
    )
    assert metrics_rule["from"] == values["networkPolicy"]["metricsFrom"]
    orch_np = component(docs, "NetworkPolicy", "orchestrator")
    client_rule = orch_np["spec"]["ingress"][0]
    assert client_rule["ports"][0]["port"] == values["orchestrator"]["settings"]["grpc_port"]
    assert client_rule.get("from", []) == values["networkPolicy"]["clientsFrom"]
