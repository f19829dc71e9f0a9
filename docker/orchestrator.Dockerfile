# syntax=docker/dockerfile:1
# Orchestrator (public gRPC API): slim Python, non-root, no GPU libraries and no torch: the base install is
# what the service needs (the model code is the `model` extra, installed only in the Triton image).
#   docker build -f docker/orchestrator.Dockerfile -t moss-speech-orchestrator:0.1.0 .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY builders/ builders/
COPY services/ services/
COPY model_repository/ model_repository/
COPY contract/ contract/
COPY cli/ cli/
COPY proto/ proto/
# A regular (not editable) install: the image carries no source tree.
# The same image runs the realtime gateway (`moss-speech realtime`): the `realtime` extra (websockets, onnxruntime)
# and silero-vad without its torch requirement (only its ONNX model is read); `tracing` for OpenTelemetry.
# The import check fails the build if the service ever needs torch again.
RUN pip install ".[tracing,realtime]" && pip install --no-deps "silero-vad==6.2.3" \
    && python -c "import moss_speech.services.server, moss_speech.services.realtime.server, sys; assert 'torch' not in sys.modules"

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
