"""The chart's voice store: a PVC (kept when the release goes) mounted read-write into every Triton pod, with
MOSS_SPEECH_VOICE_STORE pointing at it and the per-key limit and prompt cap as env; an existing claim is used as
it is; disabled, an emptyDir (per pod). Rendered with the real helm binary."""

from __future__ import annotations

import pytest
import yaml
from helm_support import CHART, RELEASE, Helm, component

from moss_speech.contract.voices import VoiceLimits

CLAIM = f"{RELEASE}-moss-speech-voices"


def _render(helm: Helm, tmp_path, values: dict) -> list[dict]:
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    return helm.render([f])


def _triton(docs: list[dict]) -> tuple[dict, dict, dict]:
    """The Triton pod spec, its main container's env (name -> value) and mounts (name -> mount)."""
    pod = component(docs, "Deployment", "triton")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    return pod, {e["name"]: e.get("value") for e in c["env"]}, {m["name"]: m for m in c["volumeMounts"]}


def test_default_store_is_a_kept_pvc_mounted_read_write(helm: Helm, tmp_path):
    docs = _render(helm, tmp_path, {})
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == CLAIM)
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"  # voices survive an uninstall
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"] and pvc["spec"]["resources"]["requests"]["storage"]
    pod, env, mounts = _triton(docs)
    assert env["MOSS_SPEECH_VOICE_STORE"] == "/voices" == mounts["voices"]["mountPath"]
    assert not mounts["voices"].get("readOnly")  # the `voice` model writes here
    limits = VoiceLimits()  # the chart's defaults are the code's
    assert env["MOSS_SPEECH_MAX_VOICES_PER_KEY"] == str(limits.max_per_key)
    assert env["MOSS_SPEECH_VOICE_PROMPT_TOKENS"] == str(limits.prompt_tokens)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["voices"]["persistentVolumeClaim"]["claimName"] == CLAIM
    assert mounts["models"]["mountPath"] != "/voices" and mounts["models"]["readOnly"]


def test_rwx_existing_claim_settings_and_replicas(helm: Helm, tmp_path):
    docs = _render(
        helm,
        tmp_path,
        {
            "triton": {"replicaCount": 3},
            "voiceStore": {
                "existingClaim": "shared-voices",
                "mountPath": "/data/voices",
                "maxPerKey": 5,
                "promptTokens": 40,
                "accessModes": ["ReadWriteMany"],
            },
        },
    )
    assert not any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == CLAIM for d in docs)
    pod, env, mounts = _triton(docs)
    assert {v["name"]: v for v in pod["volumes"]}["voices"]["persistentVolumeClaim"]["claimName"] == "shared-voices"
    assert env["MOSS_SPEECH_VOICE_STORE"] == "/data/voices" == mounts["voices"]["mountPath"]
    assert env["MOSS_SPEECH_MAX_VOICES_PER_KEY"] == "5" and env["MOSS_SPEECH_VOICE_PROMPT_TOKENS"] == "40"
    docs = _render(helm, tmp_path, {"voiceStore": {"accessModes": ["ReadWriteMany"], "storageClassName": "nfs"}})
    pvc = next(d for d in docs if d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == CLAIM)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"] == "nfs"


def test_disabled_store_is_an_empty_dir(helm: Helm, tmp_path):
    docs = _render(helm, tmp_path, {"voiceStore": {"enabled": False}})
    assert not any(d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == CLAIM for d in docs)
    pod, env, mounts = _triton(docs)
    assert {v["name"]: v for v in pod["volumes"]}["voices"] == {"name": "voices", "emptyDir": {}}
    assert env["MOSS_SPEECH_VOICE_STORE"] == mounts["voices"]["mountPath"]


@pytest.mark.parametrize(
    "bad",
    [
        {"maxPerKey": 0},
        {"promptTokens": "20"},
        {"accessModes": ["ReadOnlyMany"]},
        {"mountPath": "voices"},
        {"unknown": 1},
    ],
)
def test_schema_refuses_bad_values(helm: Helm, tmp_path, bad):
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump({"voiceStore": bad}))
    proc = helm.run(*helm.template_args([f]), check=False)
    assert proc.returncode != 0 and "voiceStore" in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"voiceStore": {"enabled": False}, "triton": {"replicaCount": 2}}, "its own voice folder"),
        (
            {"voiceStore": {"enabled": False}, "triton": {"autoscaling": {"enabled": True, "maxReplicas": 3}}},
            "may run 3 replicas",
        ),
        ({"voiceStore": {"accessModes": ["ReadWriteOncePod"]}, "triton": {"replicaCount": 2}}, "ReadWriteOncePod"),
    ],
)
def test_store_that_replicas_cannot_share_is_refused(helm: Helm, tmp_path, values, message):
    """Several Triton replicas must see the same voices: a per-pod folder or a one-pod claim is refused."""
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump(values))
    proc = helm.run(*helm.template_args([f]), check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    one = {**values, "triton": {"replicaCount": 1}}  # the same store with one replica is fine
    assert _render(helm, tmp_path, one)


def test_rwo_store_with_replicas_warns_in_notes(helm: Helm, tmp_path):
    """ReadWriteOnce serves several replicas on one node only: the install notes say so (the chart cannot know
    where pods land, so it warns rather than refuses)."""

    def notes(values: dict) -> str:
        f = tmp_path / "values.yaml"
        f.write_text(yaml.safe_dump(values))
        args = ["install", RELEASE, str(CHART), "--dry-run=client", "--namespace", "speech", "-f", str(f)]
        return helm.run(*args).stdout.split("NOTES:", 1)[1]

    assert "Multi-Attach" in notes({"triton": {"replicaCount": 2}})
    assert "Multi-Attach" not in notes({"triton": {"replicaCount": 1}})
    assert "Multi-Attach" not in notes(
        {"triton": {"replicaCount": 2}, "voiceStore": {"accessModes": ["ReadWriteMany"]}}
    )
