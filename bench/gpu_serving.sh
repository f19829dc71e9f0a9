#!/usr/bin/env bash
# The served path on a GPU machine that has PyTorch but neither tritonserver nor this project's packages: the
# tritonserver of nvidia-pytriton and the missing wheels travel with the checkout, then tests/serving runs against a
# real tritonserver whose `llm` is the torch runtime on the GPU (KIND_GPU, CUDA graphs), compared with in-process
# generation on the CPU. Usage, from the repository root on that machine:
#   bash bench/gpu_serving.sh CARRY_DIR
# CARRY_DIR holds *.whl (pydantic, tritonclient, python-rapidjson, ...) and pytriton-server.tar.xz (pytriton's
# tritonserver/ with its vendored libraries; only the current Python's backend stub needs to be in it).
set -uo pipefail
carry=$1
log=${OUT:-/tmp}/gpu-serving.log
exec > >(tee "$log") 2>&1
source bench/gpu_env.sh "$carry"
tar xJf "$carry/pytriton-server.tar.xz" -C /tmp/site || exit 1
# The stub links libpython3.X.so.1.0: the interpreter's own LIBDIR when it is a shared build.
libdir=$(python3 -c "import sysconfig as s; print(s.get_config_var('LIBDIR'))")
ls "$libdir"/libpython3*.so* 2>/dev/null || echo "no shared libpython in $libdir"
export LD_LIBRARY_PATH=$libdir:${LD_LIBRARY_PATH:-}
ldd /tmp/site/pytriton/tritonserver/python_backend_stubs/*/triton_python_backend_stub | grep "not found"
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader -l 3 > "${OUT:-/tmp}/gpu-apps.log" &
MOSS_SPEECH_TEST_LLM=torch-cuda timeout 420 python3 -m pytest -q -x -p no:cacheprovider -o addopts="" -rs \
    tests/serving/test_serving_ensemble.py 2>&1 | tail -30
echo "== processes that held GPU memory during the run"
sort -u "${OUT:-/tmp}/gpu-apps.log" | head
