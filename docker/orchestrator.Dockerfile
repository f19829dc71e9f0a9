# syntax=docker/dockerfile:1
# Orchestrator (public gRPC API): slim Python, non-root, no GPU libraries.
#   docker build -f docker/orchestrator.Dockerfile -t moss-speech-orchestrator:0.1.0 .
# The project pins torch (used by the model code); the CPU build is installed first from PyTorch's CPU index
# so that pip does not pull the multi-GB CUDA build. `torch==X+cpu` satisfies the `torch==X` pin.
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY builders/ builders/
COPY services/ services/
COPY model_repository/ model_repository/
COPY contract/ contract/
COPY cli/ cli/
COPY proto/ proto/
# A regular (not editable) install: the image carries no source tree.
RUN pip install . && python -c "import moss_speech.services.settings"

FROM python:${PYTHON_VERSION}-slim-bookworm
# libsndfile: soundfile (audio decode of client uploads).
RUN apt-get update && apt-get install -y --no-install-recommends libsndfile1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 moss && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin moss
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Ports: ServiceSettings.grpc_port / metrics_port defaults (the chart sets them from values).
EXPOSE 50051 9090
USER 10001:10001
ENTRYPOINT ["moss-speech"]
CMD ["serve"]
