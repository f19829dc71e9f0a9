# syntax=docker/dockerfile:1
# Triton with the MOSS-Speech project installed: the Python-backend models import `moss_speech`, the init
# container runs `moss-speech build` (TensorRT ships in this image), and `moss-speech triton` launches the
# image's own /opt/tritonserver/bin/tritonserver.
#   docker build -f docker/triton.Dockerfile --build-arg TRITON_TAG=24.12 -t moss-speech-triton:0.1.0 .
# TRITON_TAG must be a release whose Python is >= 3.11 (24.12 and later: Ubuntu 24.04, Python 3.12), since the
# Python backend runs models with the image's python3.
#
# GPU libraries, matched to the container (24.12: CUDA 12.6, cuDNN 9, TensorRT 10.7):
# - torch from PyTorch's CUDA index for the container's CUDA (TORCH_CUDA=cu126), not PyPI's default build (which
#   follows PyTorch's newest CUDA and bundles its own copy of it). Change TORCH_CUDA with TRITON_TAG.
# - onnxruntime-gpu only (the `gpu` extra; PyPI's 1.19+ builds are CUDA 12 + cuDNN 9). The `model` extra lists the
#   CPU `onnxruntime`; both wheels install the same `onnxruntime` module, and whichever is installed last wins, so
#   the CPU one would silently hide the CUDA execution provider. The model extra's other dependencies are
#   installed from pyproject.toml without it, the project itself with --no-deps, and the build fails if the CPU
#   wheel ever gets in.
# - tensorrt (Python bindings) of the container's TensorRT version (TENSORRT_VERSION): engines load only in the
#   version that built them; `moss-speech triton` checks it at startup (model_repository/runtime/gpu_check.py).
ARG TRITON_TAG=24.12
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3
ARG TORCH_CUDA=cu126
ARG TENSORRT_VERSION=10.7.0
# Ubuntu 24.04 marks the system Python as externally managed; this image is its only user.
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1 \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -c "import sys; assert sys.version_info >= (3, 11), sys.version"
WORKDIR /opt/moss-speech
COPY pyproject.toml setup.py README.md ./
COPY builders/ builders/
COPY services/ services/
COPY model_repository/ model_repository/
COPY contract/ contract/
COPY cli/ cli/
COPY proto/ proto/
RUN python3 -m pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" "torch==2.13.0" \
    && python3 - > /tmp/requirements.txt <<'EOF'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
for req in project["dependencies"] + extras["model"] + extras["gpu"]:
    if re.split(r"[<>=!~ \[;]", req, maxsplit=1)[0].lower() != "onnxruntime":  # the CPU build: see above
        print(req)
EOF
RUN python3 -m pip install -r /tmp/requirements.txt "tensorrt-cu12==${TENSORRT_VERSION}" \
    && python3 -m pip install --no-deps . && moss-speech --help >/dev/null \
    && python3 - <<'EOF'
from importlib import metadata
import torch, tensorrt
try:
    metadata.version("onnxruntime")
    raise SystemExit("the CPU onnxruntime wheel is installed: it shadows onnxruntime-gpu")
except metadata.PackageNotFoundError:
    pass
assert torch.version.cuda and torch.version.cuda.startswith("12."), f"not a CUDA 12 torch: {torch.__version__}"
print("torch", torch.__version__, "onnxruntime-gpu", metadata.version("onnxruntime-gpu"), "tensorrt", tensorrt.__version__)
EOF
# The Triton image's non-root user (uid 1000); the chart runs the pod as this uid.
USER triton-server
WORKDIR /home/triton-server
EXPOSE 8000 8001 8002
ENTRYPOINT []
CMD ["moss-speech", "triton", "--repo", "/models/repository"]
