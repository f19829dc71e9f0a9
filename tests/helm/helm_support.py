"""Helpers for the chart tests: a helm runner, rendered-manifest lookups, merged values.

(A uniquely named module: several test folders have their own non-package conftest.py.)
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "moss-speech"
VALUES_SETS = {p.stem.removesuffix("-values"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))}
KUBE_VERSIONS = ("1.29.0", "1.33.0")
# CRDs the chart may render; `--api-versions` tells `helm template` they are served.
CRD_API_VERSIONS = ("monitoring.coreos.com/v1",)
RELEASE = "moss"


@dataclass
class Helm:
    binary: Path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(self.binary), *args], capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise AssertionError(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def template_args(
        self, values: list[Path], kube_version: str = KUBE_VERSIONS[-1], release: str = RELEASE
    ) -> list[str]:
        args = ["template", release, str(CHART), "--namespace", "speech", "--kube-version", kube_version]
        for api in CRD_API_VERSIONS:
            args += ["--api-versions", api]
        for v in values:
            args += ["-f", str(v)]
        return args

    def render(self, values: list[Path], kube_version: str = KUBE_VERSIONS[-1]) -> list[dict[str, Any]]:
        out = self.run(*self.template_args(values, kube_version)).stdout
        return [d for d in yaml.safe_load_all(out) if d]


def chart_values(*files: Path) -> dict[str, Any]:
    """values.yaml with the files merged over it (maps merge, everything else replaces), as helm does."""

    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in over.items()}}
        return over

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in files:
        values = merge(values, yaml.safe_load(f.read_text()) or {})
    return values


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def component(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The one object of `kind` whose component label is `name`."""
    found = [
        d
        for d in docs
        if d["kind"] == kind
        and d["metadata"]["labels"].get("app.kubernetes.io/component") == name
        and not d["metadata"]["name"].endswith("-headless")
    ]
    assert len(found) == 1, f"expected one {kind} for {name}, got {[d['metadata']['name'] for d in found]}"
    return found[0]
