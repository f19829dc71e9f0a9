#!/usr/bin/env bash
# One entry point for a fresh machine (Debian/Ubuntu with Python >= 3.11 and apt):
#   ./dev.sh demo   set everything up, then run the main job (the served speech-to-speech demo)
#   ./dev.sh test   set everything up, then lint (ruff check, ruff format --check) and run the whole test suite
#   ./dev.sh unit   set everything up, then run the unit tier only (pytest -m "not slow": no tritonserver, no
#                   service process, no helm; under 90 s on 2 cores)
#   ./dev.sh setup  only set up (.venv, system packages)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${MOSS_VENV:-.venv}
PY=${PYTHON:-python3}

system_packages() {
  # espeak-ng + sox: spoken test questions; libsndfile1: soundfile; libb64-0d: Triton's perf_analyzer. redis-server: the Redis session-store tests (started on their own ports, never the system service).
  # prometheus (+ promtool): the observability tests run it on loopback with their own config, never the service.
  local need=()
  # chromium: the realtime page's headless browser test (tests/realtime/test_realtime_page.py).
  for pkg in espeak-ng sox libsndfile1 libb64-0d prometheus chromium redis-server; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ] && command -v apt-get >/dev/null; then
    local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}" >/dev/null
  fi
}

python_env() {
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  local stamp="$VENV/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e ".[model,dev,triton-local,trt-rtx,tracing,realtime]"
    # silero-vad hard-requires torch but the gateway only reads its ONNX model: no dependencies.
    "$VENV/bin/pip" install -q --no-deps "silero-vad==6.2.3"
    touch "$stamp"
  fi
}

setup() { system_packages; python_env; }

run_pytest() {
  set +e
  "$VENV/bin/python" -m pytest -q "$@"
  local rc=$?
  # pytest exits 5 when it collected no tests; that is not a failure of the suite.
  [ $rc -eq 5 ] && rc=0
  exit $rc
}

case "${1:-demo}" in
  setup) setup ;;
  demo) setup; shift || true; exec "$VENV/bin/moss-speech" demo "$@" ;;
  test)
    setup; shift || true
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    run_pytest "$@" ;;
  unit) setup; shift || true; run_pytest -m "not slow" "$@" ;;
  *) echo "usage: $0 [demo|test|unit|setup]" >&2; exit 2 ;;
esac
