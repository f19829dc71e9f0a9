"""The build Job's memory comes from the checkpoint size (values build.memory), not Triton's limits."""

from __future__ import annotations

import math

import pytest
from helm_support import chart_values, component


def _init(helm, tmp_path, overrides: str) -> dict:
    values = tmp_path / "v.yaml"
    values.write_text(overrides)
    docs = helm.render([values])
    pod = component(docs, "Deployment", "triton")["spec"]["template"]["spec"]
    job = component(docs, "Job", "build")["spec"]["template"]["spec"]
    (build,) = [c for c in job["containers"] if c["name"] == "build-model-repository"]
    return {"build": build["resources"], "triton": pod["containers"][0]["resources"]}


def test_default_build_memory_is_derived_from_the_real_checkpoint(helm, tmp_path):
    m = chart_values()["modelRepository"]["build"]["memory"]
    want = math.ceil(m["baseGiB"] + m["perCheckpointGiB"] * m["checkpointGiB"])
    assert want == 55  # the figure docs/deploy.md gives for the real model (17 GiB bf16 checkpoint)
    res = _init(helm, tmp_path, "{}")
    assert res["build"]["limits"]["memory"] == res["build"]["requests"]["memory"] == f"{want}Gi"
    assert res["build"]["limits"]["nvidia.com/gpu"] == 1  # gpu target: engines are built on the pod's GPU
    assert res["build"]["limits"]["memory"] != res["triton"]["limits"]["memory"]  # separate from Triton's


@pytest.mark.parametrize(("size", "want"), [(4, "16Gi"), (40.5, "126Gi")])
def test_build_memory_follows_the_checkpoint_size(helm, tmp_path, size, want):
    res = _init(
        helm, tmp_path, f"modelRepository:\n  build:\n    memory:\n      checkpointGiB: {size}\n    target: cpu\n"
    )
    assert res["build"]["limits"]["memory"] == want and "nvidia.com/gpu" not in res["build"]["limits"]


def test_explicit_build_resources_win(helm, tmp_path):
    res = _init(helm, tmp_path, "modelRepository:\n  build:\n    resources:\n      limits:\n        memory: 99Gi\n")
    assert res["build"] == {"limits": {"memory": "99Gi"}}


def test_schema_rejects_a_bad_checkpoint_size(helm, tmp_path):
    values = tmp_path / "v.yaml"
    values.write_text("modelRepository:\n  build:\n    memory:\n      checkpointGiB: 0\n")
    proc = helm.run("template", "x", str(component.__globals__["CHART"]), "-f", str(values), check=False)
    assert proc.returncode != 0 and "checkpointGiB" in proc.stderr
