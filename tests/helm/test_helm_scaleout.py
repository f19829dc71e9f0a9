"""Chart scale-out cases, each rendered: the orchestrator reaches every Triton pod (headless + dns:///), its
liveness ignores Triton, strategy types render only their own fields, rollouts have a progress deadline."""

from __future__ import annotations

from pathlib import Path

import yaml
from helm_support import KUBE_VERSIONS, VALUES_SETS, by_kind, component


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


# --- session store ------------------------------------------------------------------------------------------


def fails(helm, tmp_path: Path, values: dict) -> str:
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(values))
    proc = helm.run(*helm.template_args([VALUES_SETS["default"], f]), check=False)
    assert proc.returncode != 0, "the chart rendered values it must refuse"
    return proc.stderr


def redis_env(docs) -> dict:
    c, _ = orchestrator_container(docs)
    return {e["name"]: e for e in c["env"]}


def test_default_is_redis_bundled_and_url_only_from_a_secret(rendered) -> None:
    for (_, _), docs in rendered.items():
        env = redis_env(docs)
        assert env["MOSS_SPEECH_SESSIONS_BACKEND"]["value"] == "redis"
        ref = env["MOSS_SPEECH_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert "value" not in env["MOSS_SPEECH_REDIS_URL"]
        secrets = by_kind(docs, "Secret")
        assert ref["key"] in secrets[ref["name"]]["stringData"]
    docs = rendered[("default", KUBE_VERSIONS[-1])]
    redis = component(docs, "Deployment", "redis")
    spec = redis["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    (c,) = spec["template"]["spec"]["containers"]
    assert c["image"].startswith("redis:")
    # The password reaches Redis in its config file (from the Secret), never in args or env.
    assert c["command"] == ["redis-server", "/etc/redis/redis.conf"] and "env" not in c
    secret = by_kind(docs, "Secret")[component(docs, "Service", "redis")["metadata"]["name"]]["stringData"]
    assert f"requirepass {secret['password']}" in secret["redis.conf"]
    assert secret["redis-url"].startswith(f"redis://:{secret['password']}@")
    # Only the orchestrators reach it, and they may.
    policy = by_kind(docs, "NetworkPolicy")[redis["metadata"]["name"]]
    assert (
        policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        == "orchestrator"
    )
    orch_policy = component(docs, "NetworkPolicy", "orchestrator")["spec"]["egress"]
    assert any(p.get("ports") == [{"port": 6379, "protocol": "TCP"}] for p in orch_policy)


def test_external_redis_url_from_its_secret(helm, tmp_path) -> None:
    docs = render_with(
        helm,
        tmp_path,
        {
            "sessions": {
                "redis": {"bundled": {"enabled": False}, "external": {"secretName": "my-redis", "secretKey": "url"}}
            }
        },
    )
    env = redis_env(docs)
    assert env["MOSS_SPEECH_REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "my-redis", "key": "url"}
    assert not [d for d in docs if d["metadata"]["labels"].get("app.kubernetes.io/component") == "redis"]
    assert "external.secretName" in fails(helm, tmp_path, {"sessions": {"redis": {"bundled": {"enabled": False}}}})


def test_plain_redis_url_is_refused(helm, tmp_path) -> None:
    err = fails(helm, tmp_path, {"orchestrator": {"settings": {"redis_url": "redis://:pw@h:6379/0"}}})
    assert "plain env" in err and "pw@h" not in err


def test_memory_store_refuses_more_than_one_replica(helm, tmp_path) -> None:
    mem = {"sessions": {"backend": "memory"}}
    assert "replicaCount is 2" in fails(helm, tmp_path, mem)
    err = fails(
        helm,
        tmp_path,
        mem
        | {"orchestrator": {"replicaCount": 1, "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 3}}},
    )
    assert "maxReplicas is 3" in err
    docs = render_with(helm, tmp_path, mem | {"orchestrator": {"replicaCount": 1}})
    env = redis_env(docs)
    assert env["MOSS_SPEECH_SESSIONS_BACKEND"]["value"] == "memory" and "MOSS_SPEECH_REDIS_URL" not in env
    assert not by_kind(docs, "Secret").get("moss-moss-speech-redis")


# --- rules between values -------------------------------------------------------------------------------------


def test_hpa_min_above_max_is_refused(helm, tmp_path) -> None:
    for comp in ("triton", "orchestrator"):
        err = fails(helm, tmp_path, {comp: {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}}})
        assert f"{comp}.autoscaling.minReplicas (5) must not exceed maxReplicas (2)" in err
    docs = render_with(
        helm, tmp_path, {"triton": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 3}}}
    )
    assert component(docs, "HorizontalPodAutoscaler", "triton")["spec"]["minReplicas"] == 3


def model_paths(docs) -> list[str]:
    """Every path the build Job and Triton use: the Job's args and env, Triton's env, mounts of both."""
    job = component(docs, "Job", "build")["spec"]["template"]["spec"]
    triton = component(docs, "Deployment", "triton")["spec"]["template"]["spec"]
    out = []
    for c in job["containers"] + triton["containers"] + triton.get("initContainers", []):
        out += [
            a.split("=", 1)[1]
            for a in c.get("args", [])
            if a.startswith("--") and "=" in a and a.split("=", 1)[1].startswith("/")
        ]
        # Every absolute path in the env, but the voice store's: a volume of its own (voiceStore.mountPath).
        out += [
            e["value"]
            for e in c.get("env", [])
            if str(e.get("value", "")).startswith("/") and e["name"] != "MOSS_SPEECH_VOICE_STORE"
        ]
        out += [m["mountPath"] for m in c.get("volumeMounts", []) if m["name"] == "models"]
    return out


def test_mount_path_flows_into_every_model_path(helm, tmp_path) -> None:
    docs = render_with(helm, tmp_path, {"modelRepository": {"volume": {"mountPath": "/data/moss"}}})
    paths = model_paths(docs)
    assert len(paths) >= 8
    assert all(p.startswith("/data/moss") for p in paths), [p for p in paths if not p.startswith("/data/moss")]
    err = fails(helm, tmp_path, {"modelRepository": {"volume": {"mountPath": "/data"}, "path": "/models/repo"}})
    assert "outside modelRepository.volume.mountPath" in err


def triton_container(docs):
    deploy = component(docs, "Deployment", "triton")
    return next(c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "triton"), deploy


def test_extra_args_reach_tritonserver_through_the_launcher(helm, tmp_path) -> None:
    """Parse the rendered command + args with the launcher's own parser: extra args end up as tritonserver's."""
    import argparse

    from moss_speech.cli import triton as triton_cli

    extra = ["--metrics-config=summary_latencies=true", "--log-info=false"]
    docs = render_with(helm, tmp_path, {"triton": {"extraArgs": extra}})
    c, _ = triton_container(docs)
    parser = argparse.ArgumentParser()
    triton_cli.register(parser.add_subparsers())
    args = parser.parse_args(c["command"][1:] + c["args"])
    passed = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    assert passed[-2:] == extra and "--exit-timeout-secs=60" in passed
    # Plain tritonserver takes them directly (no launcher flags, no `--`).
    docs = render_with(helm, tmp_path, {"triton": {"extraArgs": extra, "command": ["tritonserver"]}})
    c, _ = triton_container(docs)
    assert "--" not in c["args"] and c["args"][-2:] == extra
    assert not [a for a in c["args"] if a.startswith(("--ready-timeout", "--stop-timeout"))]


def test_launcher_ready_timeout_follows_the_startup_probe(helm, tmp_path) -> None:
    docs = render_with(helm, tmp_path, {"triton": {"startupProbe": {"periodSeconds": 15, "failureThreshold": 80}}})
    c, _ = triton_container(docs)
    assert "--ready-timeout=1200" in c["args"]


def test_triton_drains_before_it_is_killed(rendered) -> None:
    c, deploy = triton_container(rendered[("default", KUBE_VERSIONS[-1])])
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    drain = int(next(a for a in c["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
    stop = int(next(a for a in c["args"] if a.startswith("--stop-timeout=")).split("=")[1])
    grace = deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # Long enough for the orchestrators' dns:/// re-resolution (triton_resolve_seconds) to drop the pod.
    assert sleep >= 10 and stop > drain and grace > sleep + stop


def test_progress_deadlines_are_values(helm, tmp_path) -> None:
    docs = render_with(
        helm, tmp_path, {"triton": {"progressDeadlineSeconds": 7200}, "orchestrator": {"progressDeadlineSeconds": 900}}
    )
    assert component(docs, "Deployment", "triton")["spec"]["progressDeadlineSeconds"] == 7200
    assert component(docs, "Deployment", "orchestrator")["spec"]["progressDeadlineSeconds"] == 900
    assert "progressDeadlineSeconds" in fails(helm, tmp_path, {"triton": {"progressDeadlineSeconds": "soon"}})


# --- the model build ------------------------------------------------------------------------------------------


def test_build_runs_once_per_revision_and_triton_waits_for_it(rendered) -> None:
    docs = rendered[("default", KUBE_VERSIONS[-1])]
    job = component(docs, "Job", "build")
    assert job["metadata"]["name"].endswith("-r1")  # one Job per release revision
    jc = job["spec"]["template"]["spec"]["containers"][0]
    script, jenv = jc["command"][2], {e["name"]: e["value"] for e in jc["env"]}
    assert "flock" in script and script.index("flock") < script.index("moss-speech build")
    assert script.index("moss-speech build") < script.index("BUILD_MARK")  # marked only after the build
    _, deploy = triton_container(docs)
    (wait,) = deploy["spec"]["template"]["spec"]["initContainers"]
    wenv = {e["name"]: e["value"] for e in wait["env"]}
    assert wenv["BUILD_MARK"] == jenv["BUILD_MARK"] and wenv["REVISION"] == jenv["REVISION"] == "1"
    assert wenv["BUILD_JOB"] == job["metadata"]["name"]
    assert "manifest.json" in wait["command"][2]
    # Same node pool as Triton (a gpu build needs the GPU kind the engines will run on).
    tspec = deploy["spec"]["template"]["spec"]
    assert job["spec"]["template"]["spec"]["tolerations"] == tspec["tolerations"]


def test_prebuilt_renders_no_build(rendered) -> None:
    assert not by_kind(rendered[("gpu", KUBE_VERSIONS[-1])], "Job")


# --- monitoring -----------------------------------------------------------------------------------------------


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_monitoring_values_reference_only_rendered_objects(rendered) -> None:
    docs = rendered[("monitoring", KUBE_VERSIONS[-1])]
    services = by_kind(docs, "Service")
    c, _ = orchestrator_container(docs)
    url = {e["name"]: e.get("value") for e in c["env"]}["MOSS_SPEECH_TRITON_URL"]
    host = url.removeprefix("dns:///").rsplit(":", 1)[0].removesuffix(".speech.svc")
    assert host in services, f"triton_url names {host}, not a Service of the release"
    pods = [d for d in docs if d["kind"] == "Deployment"]
    for mon in [d for d in docs if d["kind"] in ("ServiceMonitor", "PodMonitor")]:
        sel = mon["spec"]["selector"]["matchLabels"]
        targets = services.values() if mon["kind"] == "ServiceMonitor" else pods
        labels = (
            (lambda d: d["metadata"]["labels"])
            if mon["kind"] == "ServiceMonitor"
            else (lambda d: d["spec"]["template"]["metadata"]["labels"])
        )
        assert any(selects(sel, labels(t)) for t in targets), f"{mon['kind']} {mon['metadata']['name']} selects nothing"


def test_each_pod_is_one_service_monitor_target(rendered) -> None:
    """Per pod: the ServiceMonitor endpoints that scrape it (monitor selects Service, Service selects pod, Service
    has the endpoint's port) must number exactly one, or every series is duplicated."""
    docs = rendered[("monitoring", KUBE_VERSIONS[-1])]
    services = list(by_kind(docs, "Service").values())
    monitors = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert monitors
    for deploy in [d for d in docs if d["kind"] == "Deployment"]:
        pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
        component_ = pod_labels["app.kubernetes.io/component"]
        count = 0
        for mon in monitors:
            for svc in services:
                if not (
                    selects(mon["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
                    and selects(svc["spec"]["selector"], pod_labels)
                ):
                    continue
                ports = {p["name"] for p in svc["spec"]["ports"]}
                count += sum(1 for ep in mon["spec"]["endpoints"] if ep["port"] in ports)
        if component_ in ("triton", "orchestrator"):
            assert count == 1, f"{component_} pods are {count} ServiceMonitor targets"
        else:
            assert count <= 1, f"{component_} pods are {count} ServiceMonitor targets"
