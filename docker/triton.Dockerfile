# syntax=docker/dockerfile:1
# Triton with the MOSS-Speech project installed: the Python-backend models import `moss_speech`, the init
# container runs `moss-speech build` (TensorRT ships in this image), and `moss-speech triton` launches the
# image's own /opt/tritonserver/bin/tritonserver.
#   docker build -f docker/triton.Dockerfile --build-arg TRITON_TAG=24.12 -t moss-speech-triton:0.1.0 .
# TRITON_TAG must be a release whose Python is >= 3.11 (24.12 and later: Ubuntu 24.04, Python 3.12), since the
# Python backend runs models with the image's python3. The `model` extra brings torch (pinned, PyPI's CUDA
# build: match it to the image's driver) and the model/build dependencies.
ARG TRITON_TAG=24.12
FROM nvcr.io/nvidia/tritonserver:${TRITON_TAG}-py3
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
RUN python3 -m pip install ".[model,gpu]" && moss-speech --help >/dev/null
# The Triton image's non-root user (uid 1000); the chart runs the pod as this uid.
USER triton-server
WORKDIR /home/triton-server
EXPOSE 8000 8001 8002
ENTRYPOINT []
CMD ["moss-speech", "triton", "--repo", "/models/repository"]
