#!/usr/bin/env bash
# The GPU checks that run on a bare CUDA machine with PyTorch (no tritonserver, no TensorRT): the torch runtime on
# the GPU against the CPU reference (conformance + prefix reuse), then decode/prefill speed and GPU memory at the
# real shape (docs/gpu-verification.md items 4 and 5). Usage, from the repository root on that machine:
#   bash bench/gpu_session.sh [WHEELS_DIR]
# WHEELS_DIR holds wheels of packages the machine lacks (pydantic and its needs); they go to /tmp/site.
set -uo pipefail
log=${OUT:-/tmp}/gpu-session.log
exec > >(tee "$log") 2>&1
wheels=${1:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
source bench/gpu_env.sh "$wheels"
echo "== torch runtime on the GPU vs the CPU reference"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/runtime/test_runtime_conformance.py \
    tests/runtime/test_prefix_cache.py tests/runtime/test_cuda_graphs.py -k "torch-cuda or padded" -o addopts="" 2>&1 | tail -15
echo "== real shape, bf16"
timeout 400 python3 bench/gpu_decode_bench.py --device cuda --context 2048 --prompt 512 --steps 64
