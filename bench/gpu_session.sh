#!/usr/bin/env bash
# The GPU checks and figures the issues ask for, in stages that each fit one
# 10-minute device call (the `device` tool's `run`), writing logs and tables
# under $OUT (default: ./gpu-out).
#
#     bash bench/gpu_session.sh tests     # every GPU test: Triton, CuPy, models, VAE
#     bash bench/gpu_session.sh kernels   # triton_check + CuPy against Triton tables
#     bash bench/gpu_session.sh vae       # VAE loss table on CUDA (training rows need pyro)
#
# The device image already has torch, triton, cupy, numba and scikit-learn (see
# the device tool's KINDS.md) and no network, so fastlvm is installed without
# its dependencies.  Run the stages in this order: a failing test stage says
# the figures would not mean much.
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
tests | kernels | vae) ;;
*)
    echo "usage: bash bench/gpu_session.sh tests|kernels|vae" >&2
    exit 2
    ;;
esac
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
$PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
    || { cat "$OUT/install.log"; exit 1; }
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/device.txt"
fi

case "${1:-}" in
tests)
    # with CUDA present, tests/conftest.py leaves Triton's interpreter off and
    # the device tests (torch CUDA tensors, cupy arrays) run on the GPU
    $PY -m pytest -q --maxfail=20 -p no:cacheprovider tests/kernels tests/models 2>&1 \
        | tee "$OUT/gpu-tests.log"
    ;;
kernels)
    $PY bench/triton_check.py 2>&1 | tee "$OUT/triton-check.md"
    $PY bench/cupy_vs_triton.py --out "$OUT/cupy-vs-triton.md" 2>&1 | tail -5
    ;;
vae)
    $PY -c "
import sys; sys.path.insert(0, 'bench')
import vae_vs_peers as v
v.loss_table('cuda', False)
" 2>&1 | tee "$OUT/vae-loss-cuda.md"
    ;;
*)
    echo "usage: bash bench/gpu_session.sh tests|kernels|vae" >&2
    exit 2
    ;;
esac
